"""``python -m alphadpo_kernels env``: what to paste into a bug report.

Prints the versions of this package and of the libraries it runs on (``not installed`` for an absent one), the
CUDA card(s) and their compute capability (or ``no CUDA device``), which backends of ``fused_sequence_logps``
can run here, which compiled epilogues (``csrc/``) were built, and the Triton block-size tuning cache in use.
``--json`` prints the same as one JSON object. Nothing is compiled or launched: it only looks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

LIBRARIES = ("torch", "triton", "transformers", "accelerate", "trl")
ENV_VARS = ("TRITON_INTERPRET", "ALPHADPO_TUNING_CACHE", "CUDA_VISIBLE_DEVICES", "ALPHADPO_BUILD_CUDA",
            "ALPHADPO_CUDA_ARCHS", "ALPHADPO_REQUIRE_EXTENSIONS")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _devices() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "capability": f"sm_{props.major}{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


def _tuning_cache(devices: list[dict]) -> dict:
    """The cache file ``resolve_blocks`` reads, whether it exists, and how many (card, shape, dtype) entries it
    holds in all and for the cards seen here."""
    try:
        from .ops.sequence_logps.tuning import cache_path

        path = cache_path()
    except Exception:  # noqa: BLE001 - the report must print even when the tuning module does not import
        path = os.environ.get("ALPHADPO_TUNING_CACHE",
                              os.path.join(os.path.expanduser("~"), ".cache", "alphadpo_kernels", "tuning.json"))
    info: dict = {"path": path, "exists": os.path.isfile(path)}
    if info["exists"]:
        try:
            with open(path) as f:
                entries = json.load(f)
            if not isinstance(entries, dict):
                raise ValueError("not a JSON object")
            names = {d["name"] for d in devices}
            info["entries"] = len(entries)
            info["entries_for_these_cards"] = sum(1 for k in entries if str(k).split("|", 1)[0] in names)
        except (OSError, ValueError) as exc:
            info["error"] = f"unreadable: {exc}"
    return info


def collect() -> dict:
    """The report as a dict (what ``--json`` prints)."""
    import torch

    from . import __version__, backends

    devices = _devices()
    can = backends()
    return {
        "alphadpo_kernels": {"version": __version__, "location": os.path.dirname(os.path.abspath(__file__))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "torch_cuda": torch.version.cuda,
        "devices": devices,
        "backends": {k: can[k] for k in ("torch", "triton", "triton_interpreter", "cublas")},
        "compiled_epilogues": {"cpu (alphadpo_kernels._C)": can["cpu_epilogue"],
                               "cuda (alphadpo_kernels._C_cuda)": can["cuda_epilogue"]},
        "tuning_cache": _tuning_cache(devices),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def format_report(r: dict) -> str:
    lines = ["Copy and paste the text below into your bug report.", ""]

    def add(key: str, value) -> None:
        lines.append(f"- {key}: {value}")

    add("alphadpo_kernels", f"{r['alphadpo_kernels']['version']} ({r['alphadpo_kernels']['location']})")
    add("python", r["python"])
    add("platform", r["platform"])
    for name, v in r["versions"].items():
        add(name, v + (f" (CUDA {r['torch_cuda']})" if name == "torch" and r["torch_cuda"] else
                       " (CPU build)" if name == "torch" else ""))
    if r["devices"]:
        for d in r["devices"]:
            add(f"CUDA device {d['index']}", f"{d['name']}, {d['capability']}, {d['memory_gib']} GiB")
    else:
        add("CUDA device", "no CUDA device")
    b = r["backends"]
    runnable = [k for k in ("triton", "cublas", "torch") if b[k]]
    if b["triton_interpreter"] and not b["triton"]:
        runnable.insert(0, "triton (interpreter, CPU tensors, slow)")
    add("backends that can run here", ", ".join(runnable))
    add("compiled epilogues", ", ".join(f"{k}: {'built' if v else 'not built'}"
                                        for k, v in r["compiled_epilogues"].items()))
    t = r["tuning_cache"]
    if not t["exists"]:
        state = "does not exist (the per-architecture starting block sizes are used)"
    elif "error" in t:
        state = t["error"]
    else:
        state = f"{t['entries']} entries, {t['entries_for_these_cards']} for the card(s) here"
    add("tuning cache", f"{t['path']}: {state}")
    add("environment", ", ".join(f"{k}={v}" for k, v in r["environment"].items()) or "(none of "
        + ", ".join(ENV_VARS) + " set)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alphadpo_kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    env = sub.add_parser("env", help="print the environment report for a bug report",
                         description=__doc__.split("\n\n")[1])
    env.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if args.command == "env":
        report = collect()
        print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def env_main() -> None:
    """``alphadpo-env [--json]``: the same report as ``python -m alphadpo_kernels env`` (a console-script target)."""
    sys.exit(main(["env", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
