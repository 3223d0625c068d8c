"""Markdown overhead table from a CPU results file: ``python bench/summarize.py bench/results/<file>.json``."""
import json
import sys
from collections import defaultdict

PROVIDERS = ["published", "broadcast", "compiled", "cpp"]


def main(path):
    rows = json.load(open(path))
    table = defaultdict(dict)
    for r in rows:
        table[(r["op"], r["size"], r["mode"])][r["provider"]] = r["median_ms"]
    print("| layer | N | dtype | mode | base ms | " + " | ".join(PROVIDERS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(PROVIDERS))
    for (op, size, mode), d in table.items():
        if op != "adapted_linear":
            continue
        b = d["base"]
        layer, n, dtype = size.rsplit(" ", 2)
        cells = [f"{100 * (d[p] / b - 1):+.0f} %" if p in d else "–" for p in PROVIDERS]
        print(f"| {layer} | {n[2:]} | {dtype} | {mode} | {b:.1f} | " + " | ".join(cells) + " |")
    whole = {"mace_step": ("MACE step, full fine-tuning vs MMEA", "base"),
             "mace_energy_forces": ("MACE energy+forces, frozen vs MMEA-adapted", "frozen"),
             "mace_adapter_step": ("MACE force-training step, ELoRA vs MMEA (rank 16)", "elora")}
    for (op, size, mode), d in table.items():
        if op in whole and whole[op][1] in d and "mmea" in d:
            what, ref = whole[op]
            print(f"\n{what} ({size}, {mode}): {ref} {d[ref]:.0f} ms, MMEA {d['mmea']:.0f} ms "
                  f"({100 * (d['mmea'] / d[ref] - 1):+.0f} %; unpaired: quote bench/model_overhead.py's paired ratios)")


if __name__ == "__main__":
    main(sys.argv[1])
