"""A plan (wdl.distributed.planning) as a table: what `wdl plan` prints and a run writes to plan.txt."""

from __future__ import annotations

from typing import Any

from wdl.distributed.planning import GIB


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
