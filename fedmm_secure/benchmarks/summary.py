"""The secure-aggregation benchmark as a table: metric, ours, anchor or floor, ratio, target.

Targets and external anchors are those of docs/performance.md; a floor is measured in the same
run (see :mod:`.masking` and :mod:`.ckks`), an external anchor is quoted, not re-measured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Row", "summary_rows", "format_table"]

FLOWER_CLIENT_MS = "Flower SecAgg+ 68-114 ms"


@dataclass(frozen=True)
class Row:
    metric: str
    ours: str
    anchor: str
    ratio: str
    target: str


def _ms(v: float) -> str:
    return f"{v:.1f} ms"


def _masking_rows(m: dict) -> list[Row]:
    rows = []
    f = m.get("floor_ratios")
    if f:
        tag = f"n={f['n']} d={f['d']:,}"
        floor = f"AES floor {f['n']} keystreams"
        for clock, suffix in (("CPU", "_cpu"), ("wall", "")):
            rows.append(Row(f"masking market round, {tag}, {clock}", _ms(f[f"client{suffix}_ms"]),
                            f"{floor} {_ms(f[f'floor{suffix}_ms'])}",
                            f"{f[f'client_over_floor_{clock.lower()}']:.2f}x", "<= 1.3x"))
        rows.append(Row("  of which the masking stage (mask + hash + sign), CPU",
                        _ms(f["client_mask_stage_cpu_ms"]), f"{floor} {_ms(f['floor_cpu_ms'])}",
                        f"{f['client_mask_stage_over_floor_cpu']:.2f}x", "(part of the above)"))
        if "fast_floor_cpu_ms" in f:
            # The masks come out of the GCM code path: the same keystream, faster than the CTR
            # mode the targets' floor is measured with; against that floor too, for honesty.
            fast = f"same keystreams, GCM path {_ms(f['fast_floor_cpu_ms'])}"
            rows.append(Row("  market round against the faster keystream floor, CPU",
                            _ms(f["client_cpu_ms"]), fast,
                            f"{f['client_over_fast_floor_cpu']:.2f}x", ""))
            rows.append(Row("  masking stage against the faster keystream floor, CPU",
                            _ms(f["client_mask_stage_cpu_ms"]), fast,
                            f"{f['client_mask_stage_over_fast_floor_cpu']:.2f}x", ""))
        for clock, suffix in (("CPU", "_cpu"), ("wall", "")):
            rows.append(Row(f"masking aggregator round, {tag}, {clock}",
                            _ms(f[f"server{suffix}_ms"]),
                            f"AES floor {f['n']} self-masks {_ms(f[f'floor{suffix}_ms'])}",
                            f"{f[f'server_over_floor_{clock.lower()}']:.2f}x", "<= 2x"))
        if "fast_floor_cpu_ms" in f:
            rows.append(Row("  aggregator round against the faster keystream floor, CPU",
                            _ms(f["server_cpu_ms"]),
                            f"same keystreams, GCM path {_ms(f['fast_floor_cpu_ms'])}",
                            f"{f['server_over_fast_floor_cpu']:.2f}x", ""))
        rows.append(Row("BLAKE3 per byte (signed uploads)",
                        _ms(f["blake3_cpu_ms_per_4d_bytes"]) + " / 4d B",
                        f"AES-CTR {_ms(f['aes_ctr_keystream_cpu_ms_per_4d_bytes'])}",
                        f"{f['blake3_over_aes_per_byte']:.2f}x", ""))
        rows.append(Row("SHA-256 per byte (what uploads were signed over)",
                        _ms(f["sha256_cpu_ms_per_4d_bytes"]) + " / 4d B",
                        f"AES-CTR {_ms(f['aes_ctr_keystream_cpu_ms_per_4d_bytes'])}",
                        f"{f['sha256_over_aes_per_byte']:.2f}x", "(for comparison)"))
        rows.append(Row("GMAC per byte (for comparison)",
                        _ms(f["gmac_cpu_ms_per_4d_bytes"]) + " / 4d B",
                        f"AES-CTR {_ms(f['aes_ctr_keystream_cpu_ms_per_4d_bytes'])}",
                        f"{f['gmac_over_aes_per_byte']:.2f}x", ""))
        rows.append(Row("masking upload size", f"{f['upload_bytes_per_coordinate']:.3f} B/value",
                        "float32 4 B (Flower 2.0x)",
                        f"{f['upload_bytes_per_coordinate'] / 4:.3f}x", "<= 1.0x"))
        # The anchor is a wall time on a quiet machine; ours is CPU time (this machine is
        # shared, its wall times carry other jobs' load).
        rows.append(Row("masking market round vs Flower, CPU", _ms(f["client_cpu_ms"]),
                        FLOWER_CLIENT_MS, f"{f['client_cpu_ms'] / 68:.2f}x of 68 ms",
                        "(external, not re-measured)"))
    sh = m.get("shamir")
    if sh:
        rows.append(Row(f"Shamir split, n={sh['n']}", f"{sh['split_ms']:.3f} ms", "Flower 237 ms",
                        f"{sh['split_ms'] / 237:.4f}x", "<= 1 ms"))
        rows.append(Row(f"Shamir recover, n={sh['n']}", f"{sh['recover_ms']:.3f} ms",
                        "Flower 728 ms", f"{sh['recover_ms'] / 728:.4f}x", "<= 5 ms"))
    sc = m.get("scaling")
    if sc and sc.get("flat_memory"):
        fm = sc["flat_memory"]
        rows.append(Row("aggregator peak memory, n=100 vs n=5, d=1M",
                        f"{fm['aggregator_peak_n100_over_n5_d1M']:.2f}x", "n=5", "",
                        f"<= {fm['target']}x"))
    for g in (sc or {}).get("growth", []):
        rows.append(Row(f"aggregator growth in n, d={g['d']:,}",
                        f"time n^{g['aggregator_cpu_ms_vs_n_exponent']:.2f}, memory "
                        f"n^{g['aggregator_peak_mib_vs_n_exponent']:.2f}", "", "", "memory n^0"))
    return rows


def _ckks_rows(c: dict) -> list[Row]:
    if "skipped" in c:
        return [Row("CKKS", "skipped", c["skipped"], "", "")]
    ours = c["encrypt_floats_per_s"]["ours"] / 1e6
    anchor = c["encrypt_floats_per_s"]["tenseal_defaults"] / 1e6
    size = c["bytes_per_float32"]
    agg = c["aggregate_s"]
    return [
        Row(f"CKKS encrypt, {c['floats']:,} floats, wall", f"{ours:.2f} M/s",
            f"TenSEAL defaults {anchor:.2f} M/s (same run)", f"{ours / anchor:.2f}x", ">= 1.5 M/s"),
        Row("CKKS upload size", f"{size['ours']:.2f}x float32",
            f"TenSEAL defaults {size['tenseal_defaults']:.2f}x (NVFlare 20x)",
            f"{size['ours'] / size['tenseal_defaults']:.2f}x", "<= 8x float32"),
        Row(f"CKKS aggregate, {agg['markets']} uploads", _ms(agg["ours"] * 1e3),
            f"numpy float32 sum {_ms(agg['numpy_float32_sum_floor'] * 1e3)}",
            f"{agg['ratio_vs_floor']:.0f}x", "(no target)"),
    ]


def summary_rows(result: dict) -> list[Row]:
    """Rows for what ``fedmm-secure bench secagg`` measured (``{"masking": ..., "ckks": ...}``)."""
    return _masking_rows(result.get("masking", {})) + _ckks_rows(result.get("ckks", {"skipped": "not run"}))


def format_table(rows: list[Row]) -> str:
    head = Row("metric", "ours", "anchor or floor", "ratio", "target")
    cols = list(zip(*[(r.metric, r.ours, r.anchor, r.ratio, r.target) for r in [head, *rows]]))
    widths = [max(len(v) for v in col) for col in cols]
    lines = []
    for i, r in enumerate([head, *rows]):
        cells = (r.metric, r.ours, r.anchor, r.ratio, r.target)
        lines.append("  ".join(v.ljust(w) for v, w in zip(cells, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
