"""What writes a `wdl` dataset folder (docs/dataset-format.md): MovieLens and its GroupLens
downloads, Criteo TSV logs, the synthetic generator and its planted models, and the import of
your own Parquet/CSV files; plus "prepare on first use" (prepare.py) for the trainer.

wdl.ingest imports wdl.data (the writer, the manifest, the hashes), never the reverse: reading a
data set at training time needs none of this. Worker processes of preparation and generation
import only numpy/pyarrow modules (no torch).
"""
