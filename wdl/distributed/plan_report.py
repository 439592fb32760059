"""`wdl plan`: its arguments, and a plan (wdl.distributed.planning) printed as a table."""

from __future__ import annotations

from typing import Any

from wdl.distributed.planning import GIB, PEAK_TFLOPS, Hardware, plan
from wdl.errors import ConfigError


def _ranks(rs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(out) or "-"


def render(p: dict[str, Any]) -> str:
    g = lambda b: f"{b / GIB:,.2f}" if b >= GIB / 100 or not b else f"{b / GIB:.1e}"  # noqa: E731
    a, s, w = p["assumptions"], p["step_ms"], p["world_size"]
    out = [f"plan: {w} x {p['device']} ({p['local_world_size']} per node), batch {p['batch_size']:,} per rank "
           f"({p['global_batch_size']:,} global), TorchRec tables {p['dtype']}, embedding backend {p['backend']}", "",
           f"{'table':<28} {'rows':>14} {'dim':>4}  {'sharding':<17} {'ranks':<14} {'GiB + state':>11}"]
    for t in p["tables"]:
        name = t["name"] if t["owner"] == "torchrec" else f"{t['name'].split(' ')[0]} (wdl, {t['features']} tables)"
        out.append(f"{name:<28} {t['rows']:>14,} {t['dim']:>4}  {t['sharding']:<17} {_ranks(t['ranks']):<14} "
                   f"{g(t['bytes']):>11}")
    mem = p["memory_per_rank"]
    total = sum(m["tables_bytes"] for m in mem)
    out += ["", f"memory per rank, GiB (tables + optimiser state; HBM/host as TorchRec estimates them, with input "
                f"and output buffers; dense layers included); all ranks: {g(total)} of tables + state"]
    shown = mem if w <= 16 else sorted({max(mem, key=lambda m: m['hbm_bytes'] + m['host_bytes'])['rank'], 0, w - 1})
    out.append(f"{'rank':>6} {'HBM':>9} {'host':>9} {'tables+state':>13}")
    for r in shown:
        m = mem[r] if isinstance(r, int) else r
        out.append(f"{m['rank']:>6} {g(m['hbm_bytes']):>9} {g(m['host_bytes']):>9} {g(m['tables_bytes']):>13}")
    if w > 16:
        out.append(f"  (ranks 0, {w - 1} and the fullest shown; --json lists all {w})")
    cap = p["capacity"]
    out.append(f"capacity per rank: {g(cap['hbm_bytes'])} HBM, {g(cap['host_bytes'])} host; "
               f"{cap['reserved_fraction']:.0%} kept free as TorchRec's planner does")
    d = p["dense"]
    out += ["", f"step estimate, busiest rank ({p['busiest_rank']}), ms:",
            f"  look-up forward compute     {s['lookup_fwd']:10.4f}",
            f"  look-up backward compute    {s['lookup_bwd']:10.4f}   (gradients and the fused optimiser)",
            f"  input communication         {s['input_comms']:10.4f}   (ids to the ranks that hold their rows)",
            f"  output communication        {s['output_comms']:10.4f}   (pooled rows back, their gradients out)",
            f"  dense MLP compute           {s['dense_compute']:10.4f}   ({d['flops_per_step'] / 1e9:,.2f} GFLOP at an "
            f"assumed {d['peak_tflops']:g} TFLOP/s)",
            f"  dense gradient all-reduce   {s['dense_allreduce']:10.4f}   ({d['params']:,} parameters)",
            f"  total                       {s['total']:10.4f}",
            f"the busiest rank does {p['busiest_share']:.1%} of all embedding work (even: {1 / w:.1%})",
            f"estimated samples/s: {p['samples_per_second']:,.0f}", "",
            f"assumptions ({a['source']}, unless given): HBM {a['hbm_bw_gbs']:,.0f} GB/s, DDR {a['ddr_bw_gbs']:,.0f} "
            f"GB/s, intra-node {a['intra_node_bw_gbs']:,.0f} GB/s, inter-node {a['inter_node_bw_gbs']:,.1f} GB/s "
            f"(all-to-all here {a['all_to_all_bw_gbs']:,.1f}, all-reduce {a['all_reduce_bw_gbs']:,.1f}); backward "
            f"{a['bwd_compute_multiplier']:g}x forward; {a['pooling_factor']:g} id per feature and sample; "
            f"no overlap of communication and compute"]
    return "\n".join(out)


def add_plan_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs or processes) in all")
    p.add_argument("--local-world-size", type=int, default=8, help="ranks per node (default 8)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GiB of device memory per rank (default 80)")
    p.add_argument("--ddr-gb", type=float, default=512.0, help="GiB of host memory per rank (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the config's data.batch_size)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="TorchRec table weights")
    p.add_argument("--table-rows", nargs="+", default=[], metavar="FEATURE=ROWS",
                   help="table sizes, e.g. for vocab_size: auto when the data set is not prepared")
    p.add_argument("--uvm", action="store_true", help="let TorchRec keep tables in host memory behind an HBM cache")
    for flag, what in (("hbm-bw", "HBM"), ("ddr-bw", "host memory"), ("intra-bw", "intra-node link"),
                       ("inter-bw", "inter-node link")):
        p.add_argument(f"--{flag}", type=float, default=None, metavar="GB/s", help=f"{what} bandwidth (default: TorchRec's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"dense FLOP/s assumed for the MLP (default {PEAK_TFLOPS['cuda']:g} on cuda, "
                        f"{PEAK_TFLOPS['cpu']:g} on cpu)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, as for wdl train")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    import json

    from wdl.config import load_config

    if args.world_size < 1 or args.local_world_size < 1:
        raise ConfigError("--world-size and --local-world-size must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    rows = {}
    for item in args.table_rows:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--table-rows {item!r}: expected FEATURE=ROWS with ROWS >= 1")
        rows[name] = int(n)
    cfg = load_config(args.config, args.overrides)
    hw = Hardware(args.device, args.world_size, args.local_world_size, args.hbm_gb, args.ddr_gb, args.hbm_bw,
                  args.ddr_bw, args.intra_bw, args.inter_bw, args.peak_tflops, args.uvm)
    result = plan(cfg, hw, batch_size=args.batch_size or cfg.data.batch_size, dtype=args.dtype, table_rows=rows)
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0
