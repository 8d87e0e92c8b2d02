"""Session summary line for the native kernel tests: which ISA builds ran and which were skipped (and why)."""

from __future__ import annotations

import re


def pytest_terminal_summary(terminalreporter) -> None:
    from dsv4.kernels.build import ISAS

    counts = {i.name: {"ran": 0, "skipped": 0, "why": ""} for i in ISAS}
    for outcome in ("passed", "failed", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(rep, "nodeid", "")
            if "test_kernels" not in nodeid:
                continue
            for name, c in counts.items():
                if re.search(rf"[\[-]{name}[\]-]", nodeid):
                    if outcome == "skipped":
                        c["skipped"] += 1
                        c["why"] = c["why"] or str(rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else "")
                    else:
                        c["ran"] += 1
    if any(c["ran"] or c["skipped"] for c in counts.values()):
        terminalreporter.write_line("native kernel ISA builds: " + "; ".join(
            f"{name} ran {c['ran']} tests" + (f", skipped {c['skipped']} ({c['why']})" if c["skipped"] else "")
            for name, c in counts.items()))
