#!/usr/bin/env python3
"""Checks the declared MSRV (`rust-version`) against every crate a user builds.

The one toolchain of CI is newer than the MSRV, so this is what can be checked
without another: no normal or build dependency (of the core crate, the default
features, and the adapter crates) declares a newer `rust-version`; the code's
own use of newer standard-library APIs is clippy's `incompatible_msrv` lint,
which reads the same `rust-version`. Exits 1 naming the offenders.
`--as 1.xx` checks against another MSRV (to see that the check bites).
"""
import json
import subprocess
import sys


def version(v):
    return tuple(int(x) for x in v.split(".")[:2])


meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
override = sys.argv[sys.argv.index("--as") + 1] if "--as" in sys.argv else None
bad = []
for member in meta["workspace_members"]:
    msrv = override or packages[member].get("rust_version")
    if not msrv:
        bad.append(f"{packages[member]['name']}: no rust-version declared")
        continue
    seen, stack = set(), [member]
    while stack:
        node = nodes[stack.pop()]
        for dep in node["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds <= {"dev"}:
                continue  # dev-dependencies do not reach users
            if dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                stack.append(dep["pkg"])
    for pid in sorted(seen):
        need = packages[pid].get("rust_version")
        if need and version(need) > version(msrv):
            p = packages[pid]
            bad.append(f"{packages[member]['name']} (MSRV {msrv}) needs {p['name']} {p['version']} (rust-version {need})")
if bad:
    print("MSRV check failed:\n  " + "\n  ".join(bad))
    sys.exit(1)
print(f"MSRV check: {len(meta['workspace_members'])} crate(s), every dependency within its declared rust-version")
