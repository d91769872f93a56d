"""How long a verdict-cache hit takes: import, verification and restore of a ~20 MB entry.

    python bench/cache_hit.py [--mb 20] [--repeat 5]

Prints three numbers: `python -c "import amdet_gate.cache"` in a fresh interpreter (the
interpreter's own start-up included, measured against `python -c pass`), `lookup` of a
stored entry (HMAC, every file's sha256, restore into a fresh output folder) in this
process, and the whole hit in a fresh interpreter (start-up + import + open_cache + lookup),
which is what a CI job pays for a second scan of the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amdet_gate.cache import CacheKey, VerdictCache, digest_settings

SHA = "e9" * 32


def fake_outputs(folder: Path, megabytes: float) -> None:
    """An output folder shaped like a scan's, with the bulk in one safetensors file."""
    (folder / "textual_inversion").mkdir(parents=True)
    (folder / "images").mkdir()
    result = {"tool": {"name": "amdet-gate", "version": "bench"}, "verdict": "fail", "score": 1.0, "anchor": None,
              "model": {"source": "bench", "identity_sha256": SHA, "subfolder": None,
                        "weight_files": [{"name": "model.safetensors", "sha256": SHA, "size": 1}]},
              "distributions": {"clean": [0.5] * 20000}}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    (folder / "result.sarif").write_text("{}")
    (folder / "report.html").write_bytes(os.urandom(300_000))
    (folder / "summary.md").write_text("# FAIL\n")
    (folder / "target_feature.safetensors").write_bytes(os.urandom(int(megabytes * 1e6)))
    (folder / "textual_inversion" / "learned_embeds.safetensors").write_bytes(os.urandom(3000))
    for i in range(4):
        (folder / "images" / f"{i}.png").write_bytes(os.urandom(200_000))


def fresh(code: str, repeat: int) -> float:
    """Median wall time of `python -c code` in a new interpreter."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="size of the entry in MB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake_outputs(root / "out", args.mb)
        key = CacheKey(("model.safetensors:" + SHA,), None, "ab" * 32, "bench", 0, digest_settings({}))
        secret = "bench-secret-bench-secret"
        cache = VerdictCache(root / "cache", secret=secret.encode())
        assert cache.store(key, root / "out") is None
        size = sum(p.stat().st_size for p in (root / "out").rglob("*") if p.is_file())

        lookups = []
        for i in range(args.repeat):
            start = time.perf_counter()
            found = cache.fetch(key, root / f"restored{i}")
            lookups.append(time.perf_counter() - start)
            assert found.hit, found.warning

        bare = fresh("pass", args.repeat)
        imported = fresh("import amdet_gate.cache", args.repeat)
        hit = fresh(
            "import os, sys; from pathlib import Path; from amdet_gate.cache import CacheKey, open_cache, "
            "digest_settings; "
            f"key = CacheKey(('model.safetensors:{SHA}',), None, '{'ab' * 32}', 'bench', 0, digest_settings({{}})); "
            f"env = {{'AMDET_CACHE_KEY': '{secret}'}}; "
            f"found = open_cache(env, Path({str(root / 'cache')!r})).lookup(key, Path({str(root / 'fresh')!r})); "
            "sys.exit(0 if found is not None else 1)", args.repeat)

    print(f"entry: {size / 1e6:.1f} MB in {len(found.files)} files")
    print(f"python -c pass:                        {bare * 1000:7.1f} ms")
    print(f"python -c 'import amdet_gate.cache':   {imported * 1000:7.1f} ms  (+{(imported - bare) * 1000:.1f} ms)")
    print(f"lookup (verify + restore), in process: {statistics.median(lookups) * 1000:7.1f} ms  (median of "
          f"{args.repeat})")
    print(f"whole hit in a fresh interpreter:      {hit * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
