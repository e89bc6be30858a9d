#!/usr/bin/env python3
"""Summarise bench.csv: medians and spread per point, ratios to the raw device, and a plot."""
import csv, statistics, subprocess, sys, os
from collections import defaultdict

src, out = sys.argv[1], sys.argv[2]
pts = defaultdict(list)
for r in csv.DictReader(open(src)):
    try:
        pts[(r["backing"], r["target"], int(r["snapshots"]), r["workload"])].append(float(r["MBps"]))
    except ValueError:
        pass
med = {k: statistics.median(v) for k, v in pts.items()}
spread = {k: (min(v), max(v)) for k, v in pts.items()}
backings = sorted({k[0] for k in pts})
workloads = [w for w in ["seq_first", "seq_over", "rand_first", "rand_over", "read_after_rand", "qd32_seq_first", "qd32_rand_first"] if any(k[3] == w for k in pts)]
ns = sorted({k[2] for k in pts})
targets = [t for t in ["shared", "shared_prev", "thin", "snapshot", "linear"] if any(k[1] == t for k in pts)]
lines = ["# Benchmark: origin throughput against the number of snapshots", "",
         "Median MB/s over repeats (min-max), and ratio to the raw device in the same run.",
         "`linear` is dm-linear over the origin (N=0 only): the cost of any dm target on this kernel.", ""]
for b in backings:
    for w in workloads:
        raw = med.get((b, "raw", 0, w))
        lines.append(f"## {b} backing, {w}" + (f" (raw device: {raw:.1f} MB/s)" if raw else ""))
        lines.append("")
        lines.append("| snapshots | " + " | ".join(targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        for n in ns:
            cells = []
            for t in targets:
                k = (b, t, n, w)
                if k not in med:
                    cells.append("-")
                    continue
                lo, hi = spread[k]
                ratio = f" = {med[k] / raw:.2f}x raw" if raw else ""
                cells.append(f"{med[k]:.1f} ({lo:.0f}-{hi:.0f}){ratio}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
# Headline ratios
def r(t, n, w, b="ram"):
    k = (b, t, n, w)
    return med.get(k)
checks = {"met": 0, "missed": 0}
def check(text, value, target, fmt="{:.2f}"):
    ok = value >= target
    checks["met" if ok else "missed"] += 1
    lines.append(f"- {'met' if ok else '**missed**'}: {text} = {fmt.format(value)} (target >= {fmt.format(target)})")
lines.append("## First writes against dm-snapshot and dm-thin (issue 14 targets)")
lines.append("")
lines.append("Medians of the repeats; each ratio is taken between targets of the same VM run and backing.")
lines.append("")
for b in backings:
    sn1 = {w: r("snapshot", 1, w, b) for w in ["seq_first", "rand_first", "qd32_seq_first", "qd32_rand_first"]}
    for w, base in sn1.items():
        for n in (1, 8, 64):
            sh = r("shared", n, w, b)
            if sh and base:
                check(f"{b} {w}: shared N={n} / dm-snapshot N=1", sh / base, 1.0)
    for w in ["rand_first", "qd32_rand_first"]:
        for n in ns:
            th, sh = r("thin", n, w, b), r("shared", n, w, b)
            if th and sh:
                check(f"{b} {w}: shared / dm-thin at N={n}", sh / th, 1.0)
    for w in ["seq_over", "rand_over"]:
        lin = r("linear", 0, w, b)
        for n in (1, 8, 64):
            sh = r("shared", n, w, b)
            if sh and lin:
                check(f"{b} {w}: shared N={n} / dm-linear", sh / lin, 0.95)
lines.append("")
lines.append(f"Issue 14 targets: {checks['met']} met, {checks['missed']} missed.")
lines.append("")
checks["met"] = checks["missed"] = 0
lines.append("## Earlier checks against the targets")
lines.append("")
for b in backings:
    for w in ["seq_first", "rand_first", "qd32_seq_first", "qd32_rand_first"]:
        s1, s64, raw = r("shared", 1, w, b), r("shared", 64, w, b), r("raw", 0, w, b)
        if s1 and s64:
            check(f"{b} {w}: shared N=64 / N=1", s64 / s1, 0.90)
        if s1 and raw:
            check(f"{b} {w}: shared N=1 / raw", s1 / raw, 0.30)
        sn8, sh8 = r("snapshot", 8, w, b), r("shared", 8, w, b)
        if sn8 and sh8:
            check(f"{b} {w}: shared / dm-snapshot at N=8", sh8 / sn8, 10, "{:.1f}x")
        for n in ns:
            th, sh = r("thin", n, w, b), r("shared", n, w, b)
            if th and sh and n in (1, 8, 64):
                check(f"{b} {w}: shared / dm-thin at N={n}", sh / th, 1)
    for w in ["seq_over", "rand_over"]:
        raw, lin = r("raw", 0, w, b), r("linear", 0, w, b)
        for n in (1, 8, 64):
            sh = r("shared", n, w, b)
            if sh and raw:
                check(f"{b} {w}: shared N={n} / raw", sh / raw, 0.90)
        if lin and raw:
            lines.append(f"- (dm-linear / raw = {lin / raw:.2f} for {b} {w}: what any dm target costs)")
    for n in ns:
        ra, th = r("shared", n, "read_after_rand", b), r("thin", n, "read_after_rand", b)
        if ra and th and n in (1, 8, 64):
            check(f"{b} read_after_rand at N={n}: shared / dm-thin", ra / th, 1)
lines.append("")
lines.append(f"{checks['met']} checks met, {checks['missed']} missed.")
lines.append("")
# This module against the previous one (PREV=<rev> scripts/bench), measured in the same run:
# every ratio of `shared` to another target moves by exactly shared/shared_prev.
if any(k[1] == "shared_prev" for k in pts):
    lines.append("## This module against the previous one (same VM run)")
    lines.append("")
    lines.append("Median MB/s of each module and their quotient; every ratio of shared-snapshot to raw, "
                 "dm-snapshot or dm-thin moves by that quotient. A quotient below 0.90 is a loss of more "
                 "than 10%.")
    lines.append("")
    lines.append("| backing | workload | N | this | previous | this / previous |")
    lines.append("|---|---|---|---|---|---|")
    worst = None
    for b in backings:
        for w in workloads:
            for n in ns:
                a, p = med.get((b, "shared", n, w)), med.get((b, "shared_prev", n, w))
                if not a or not p:
                    continue
                q = a / p
                if worst is None or q < worst[0]:
                    worst = (q, b, w, n)
                flag = " **(loss > 10%)**" if q < 0.90 else ""
                lines.append(f"| {b} | {w} | {n} | {a:.1f} | {p:.1f} | {q:.2f}{flag} |")
    lines.append("")
    if worst:
        lines.append(f"Lowest quotient: {worst[0]:.2f} ({worst[1]} {worst[2]} N={worst[3]}).")
        lines.append("")
# Where the worker's time goes: the `stats` message after each shared-snapshot point.
log = os.path.join(out, "bench.log")
if os.path.exists(log):
    acc = defaultdict(lambda: defaultdict(list))
    # `stats0` lines (runs after 2026-12-07): the counters after the point's setup (format,
    # N creates), subtracted from the `stats` line after its workload that follows.
    base = {}
    subtracted = False
    for line in open(log):
        if not (line.startswith("stats ") or line.startswith("stats0 ")):
            continue
        head, _, body = line.partition(": ")
        kind, b, t, n, w = head.split()
        f = body.split()
        v = {f[i]: int(f[i + 1]) for i in range(0, len(f) - 1, 2)}
        if kind == "stats0":
            base[(b, t, n, w)] = v
            continue
        b0 = base.pop((b, t, n, w), None)
        if b0:
            v = {k: x - b0.get(k, 0) for k, x in v.items()}
            subtracted = True
        if v.get("copied_chunks", 0) == 0:
            continue
        acc[(b, w)][int(n[2:])].append(v)
    if acc:
        lines.append("## Where the worker's time goes (shared-snapshot, `stats` message)")
        lines.append("")
        lines.append("Per copied chunk, medians over repeats: chunks per batch (group commit), "
                     "and worker time in µs planning, copying (read origin, write COW), "
                     "committing (journal write with PREFLUSH and FUA) and releasing (submitting "
                     "the held origin writes; on RAM disks that is the write itself); and, mostly "
                     "inside the commit, the µs waiting for metadata writes and flushes and the µs "
                     "computing metadata checksums (modules that report them)" +
                     ("." if subtracted else "; these two count the whole activation, the "
                      "format and the N creates of the point's setup included (the run had no "
                      "`stats0` lines to subtract)."))
        lines.append("")
        lines.append("| backing | workload | N | chunks/batch | plan | copy | commit | release | meta write wait | crc |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for (b, w) in sorted(acc):
            for n in sorted(acc[(b, w)]):
                vs = acc[(b, w)][n]
                def m(key):
                    if any(key not in x for x in vs):
                        return "-"
                    return "%.0f" % statistics.median(x[key] / x["copied_chunks"] for x in vs)
                per_batch = statistics.median(x["copied_chunks"] / max(x["batches"], 1) for x in vs)
                lines.append(f"| {b} | {w} | {n} | {per_batch:.1f} | {m('plan_us')} | "
                             f"{m('copy_us')} | {m('commit_us')} | {m('release_us')} | "
                             f"{m('meta_write_us')} | {m('crc_us')} |")
        lines.append("")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
# Plot: one panel per workload (ram backing first), throughput vs N, one line per target.
dat = os.path.join(out, "plot.dat")
with open(dat, "w") as f:
    for b in backings:
        for w in workloads:
            for t in targets + ["raw"]:
                f.write(f"# {b} {w} {t}\n")
                for n in ns:
                    k = (b, t, 0 if t in ("raw", "linear") else n, w)
                    if k in med:
                        f.write(f"{max(n, 0.5)} {med[k]}\n")
                f.write("\n\n")
idx = 0
plots = []
for b in backings:
    for w in workloads:
        cmds = []
        for t in targets + ["raw"]:
            cmds.append(f"'{dat}' index {idx} with linespoints title '{'dm-' + t if t in ('thin', 'snapshot', 'linear') else t}'")
            idx += 1
        plots.append(f"set title '{b}: {w}' noenhanced; plot " + ", ".join(cmds))
gp = ["set terminal png size 1600,{} font ',10'".format(400 * ((len(plots) + 2) // 3)),
      f"set output '{os.path.join(out, 'plot.png')}'",
      f"set multiplot layout {(len(plots) + 2) // 3},3",
      "set logscale x 2", "set xlabel 'snapshots (0 plotted at 0.5)'", "set ylabel 'MB/s'", "set key top right", "set yrange [0:*]"]
gp += plots + ["unset multiplot"]
try:
    subprocess.run(["gnuplot"], input="\n".join(gp), text=True, check=True)
except Exception as e:
    print("plot failed:", e)
