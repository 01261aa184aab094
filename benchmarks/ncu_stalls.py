"""Where a kernel's warps stall, per SASS instruction, from Nsight Compute's source page.

    ncu ... --section SourceCounters --import-source yes -o prof python benchmarks/ncu_op.py
    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv
    python benchmarks/ncu_stalls.py src.csv SECTION [TOP]

SECTION is the index of the kernel launch in the file (0 for the first). Prints the launch's stall
samples by reason and by opcode, and its TOP instructions by samples with each one's main reason.
"""

import collections
import csv
import sys


def main():
    rows = list(csv.reader(open(sys.argv[1])))
    which, top = int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 40
    sections = [(r[1], i) for i, r in enumerate(rows) if r and r[0] == "Kernel Name"]
    name, start = sections[which]
    end = sections[which + 1][1] if which + 1 < len(sections) else len(rows)
    hdr = rows[start + 1]
    col = {h: j for j, h in enumerate(hdr)}
    data = [r for r in rows[start + 2:end] if len(r) == len(hdr)]
    samples = col["Warp Stall Sampling (All Samples)"]
    total = sum(float(r[samples] or 0) for r in data)
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    by_reason, by_op = collections.Counter(), collections.Counter()
    for r in data:
        for h in reasons:
            by_reason[h[6:]] += float(r[col[h]] or 0)
        words = r[col["Source"]].split() or ["?"]
        by_op[(words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]] += float(
            r[samples] or 0)
    print(name, "instructions", len(data), "samples", total)
    print("by reason:", ", ".join(f"{k} {v / total:.1%}" for k, v in by_reason.most_common(10)))
    print("by opcode:", ", ".join(f"{k} {v / total:.1%}" for k, v in by_op.most_common(15)))
    for i in sorted(sorted(range(len(data)), key=lambda i: -float(data[i][samples] or 0))[:top]):
        r = data[i]
        main_reason = max(reasons, key=lambda h: float(r[col[h]] or 0))[6:]
        print(f"{i:5d} {float(r[samples]) / total:6.2%} {main_reason:16s} {r[col['Source']][:90]}")


if __name__ == "__main__":
    main()
