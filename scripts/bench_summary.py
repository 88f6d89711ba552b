"""Collect runs/bench/*.json (written by scripts/bench_*.py) into runs/bench/BENCH.md."""

import json
import sys
from pathlib import Path


def table(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(
        ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    )


def main(folder: str) -> None:
    folder = Path(folder)
    parts = ["# Benchmarks", "", "ours vs upstream cn_clip, measured side by side in one run on this machine."]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        parts += ["", f"## {path.stem}", ""]
        rows = data.get("rows") if isinstance(data, dict) else data
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            parts.append(table(rows))
            meta = {k: v for k, v in data.items() if k != "rows"} if isinstance(data, dict) else {}
        else:
            meta = data
        if meta:
            parts += [
                "",
                table(
                    [
                        {"key": k, "value": json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}
                        for k, v in meta.items()
                    ]
                ),
            ]
    (folder / "BENCH.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    print((folder / "BENCH.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")
