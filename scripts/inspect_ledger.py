"""List the tensors and header of a refinement-ledger file (needs `safetensors` and `numpy`).

Usage: python3 scripts/inspect_ledger.py path/to/ledger.safetensors
"""
import json
import sys

from safetensors import safe_open
from safetensors.numpy import load_file

path = sys.argv[1]
with safe_open(path, framework="np") as f:
    meta = f.metadata()
header = json.loads(meta["payload"])
print(f"format {meta['format']} version {meta['version']}, float type {header['dtype']}")
print(f"{len(header['layers'])} layers, {len(header['sources'])} sources, {len(header['segments'])} segments")
for name, t in sorted(load_file(path).items()):
    print(f"{name} {t.dtype} {list(t.shape)} sum={float(t.astype('float64').sum()):.17g}")
