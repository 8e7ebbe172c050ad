"""Render benchmarks/README.md's table from a pytest-benchmark JSON file.

    python scripts/bench_table.py benchmarks/latest.json
"""

from __future__ import annotations

import json
import sys


def fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def main(path: str) -> None:
    data = json.loads(open(path).read())
    info = data["machine_info"]
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor'))}, "
          f"{info.get('cpu', {}).get('count', '?')} logical CPUs, Python {info['python_version']}; "
          f"run {data['datetime']}\n")
    print("| benchmark | min time | measured in the same run |")
    print("|---|---|---|")
    for b in data["benchmarks"]:
        extra = ", ".join(f"{k}={fmt(v)}" for k, v in b["extra_info"].items())
        print(f"| `{b['name']}` | {b['stats']['min'] * 1e3:.3f} ms | {extra} |")


if __name__ == "__main__":
    main(sys.argv[1])
