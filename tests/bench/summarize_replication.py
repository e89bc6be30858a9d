#!/usr/bin/env python3
"""Summary of the replication benchmark (tests/bench/replication.sh): medians per measure
and the ratios the issue asks for, with the per-repeat values."""
import csv
import statistics
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
by = defaultdict(list)
size = {}
for r in rows:
    by[r["measure"]].append(float(r["seconds"]))
    size[r["measure"]] = int(r["bytes"])


def med(m):
    return statistics.median(by[m]) if by.get(m) else float("nan")


def mbps(m):
    return size[m] / med(m) / 1e6 if by.get(m) else float("nan")


print("# Replication benchmark\n")
print("| measure | median s | MB/s | per repeat (s) |")
print("|---|---|---|---|")
for m in by:
    print("| %s | %.3f | %.0f | %s |" % (m, med(m), mbps(m), " ".join("%.3f" % v for v in by[m])))
print()


def ratio(what, a, b, note):
    print("- %s: %.3f (%s / %s)%s" % (what, med(a) / med(b), a, b, note))


print("Ratios of medians (time; below 1 is faster):\n")
ratio("full send against dd of the snapshot device", "send_full", "dd_read", "")
ratio("send | receive against a dd copy", "send_receive_full", "dd_copy", "")
ratio("incremental send against the full send", "send_incr", "send_full", " (target: under 0.03)")
if by.get("send_incr_in_tool"):
    ratio("the same, each send's own time (no process start)", "send_incr_in_tool",
          "send_full_in_tool", "")
ratio("incremental send against reading both snapshots whole", "send_incr", "compare_whole", "")
ratio("incremental send | receive against the full one", "send_receive_incr", "send_receive_full", "")
