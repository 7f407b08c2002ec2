"""Write benchmarks/results/<tag>.md and the plots from <tag>.json (written by bench.py).

    python benchmarks/speed/report.py [--tag speed]

Every number in the page comes from the JSON; the verdict on the goals of issue 5 is computed
from them (the page says which goal is met and which is not, with the ratio).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
GiB = 2**30

NOTES = Path(__file__).resolve().parent / "notes.md"


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 0.1 else f"{x:.3f} s"


def _table(name: str, entry: dict, peak_conv: float | None) -> list[str]:
    impls = entry["impls"]
    l2l = impls.get("learn2learn", {}).get("median_s")
    flops = entry.get("flops")
    tasks = entry["setting"]["meta_batch"]
    rows = [
        f"### {entry['label']}",
        "",
        "| implementation | s / meta-iteration (median) | tasks/s | vs learn2learn | GFLOP/s | % of conv peak "
        "| max RSS | meta-gradient rel. error vs innerloop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl, e in impls.items():
        if "median_s" not in e:
            rows.append(f"| {impl} | failed: {e.get('error', '?').splitlines()[-1][:120]} | | | | | | |")
            continue
        t = e["median_s"]
        speed = f"{l2l / t:.2f}x" if l2l else "-"
        gflops = f"{flops / t / 1e9:.1f}" if flops else "-"
        frac = f"{flops / t / peak_conv * 100:.0f}%" if flops and peak_conv else "-"
        err = e.get("rel_err")
        err_s = "reference" if impl == "innerloop" else ("-" if err is None else f"{err:.1e}")
        if err is not None and e.get("rel_err_vs"):
            err_s += f" (vs {e['rel_err_vs']})"
        mem = f"{e['max_rss'] / GiB:.2f} GiB" + (f" (GPU {e['cuda_peak'] / GiB:.2f})" if "cuda_peak" in e else "")
        rows.append(f"| {impl} | {_fmt_s(t)} (n={len(e['times'])}) | {tasks / t:.1f} | {speed} | {gflops} "
                    f"| {frac} | {mem} | {err_s} |")
    if flops:
        rows += ["", f"FLOPs per meta-iteration: {flops / 1e9:.1f} GFLOP (torch.utils.flop_counter, "
                 "per-task loop)."]
    return [*rows, ""]


OLD = "-0.1.0"  # bench.py's suffix of the rows that import innerloop 0.1.0 (--old-src)


def _old_vs_new(result: dict) -> list[str]:
    """Each row X with an X-0.1.0 twin: both times, the speed-up over 0.1.0 (old / new) and each
    against learn2learn. Empty when the run had no --old-src."""
    rows = []
    for name, entry in result["settings"].items():
        impls = entry["impls"]
        for old in [i for i in impls if i.endswith(OLD)]:
            new = old.removesuffix(OLD)
            t_old, t_new = impls[old].get("median_s"), impls.get(new, {}).get("median_s")
            l2l = impls.get("learn2learn", {}).get("median_s")
            up = f"**{t_old / t_new:.2f}x**" if t_old and t_new else "-"
            vs = [f"{l2l / t:.2f}x" if l2l and t else "-" for t in (t_old, t_new)]
            rows.append(f"| {name} | {new} | {_fmt_s(t_old)} | {_fmt_s(t_new)} | {up} | {vs[0]} | {vs[1]} |")
    if not rows:
        return []
    src = result.get("old_src", {})
    commit = f" (commit {src['commit'][:7]})" if src.get("commit") else ""
    return ["## Speed-up over innerloop 0.1.0", "",
            f"The `{OLD}` rows run the same benchmark code with innerloop imported from `{src.get('path', '?')}`"
            f"{commit}; each worker checked `innerloop.__file__`. Speed-up = 0.1.0's s / meta-iteration over "
            "the current one's (above 1: faster now).", "",
            "| setting | implementation | 0.1.0 s / iter | now s / iter | speed-up over 0.1.0 "
            "| 0.1.0 vs learn2learn | now vs learn2learn |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def _ratio(result: dict, setting: str, impl: str, base: str = "learn2learn") -> float | None:
    e = result["settings"].get(setting, {}).get("impls", {})
    if "median_s" in e.get(impl, {}) and "median_s" in e.get(base, {}):
        return e[base]["median_s"] / e[impl]["median_s"]
    return None


def _verdict(result: dict) -> list[str]:
    out = ["## The goals of issue 5", ""]

    def line(goal: str, value: float | None, target: float, what: str) -> str:
        if value is None:
            return f"- {goal}: not measured in this run."
        met = "**met**" if value >= target else "**not met**"
        return f"- {goal}: {met}: {what} {value:.2f}x learn2learn's tasks/s (goal {target:g}x)."

    load = result["start"]["load"][0]
    busy = load >= result["cpu_count"]  # more runnable threads than cores: other jobs slow the run
    if busy and result["threads"] == 1:
        out += [f"**Caution: the machine was busy (load average {load:.2f} at the start on {result['cpu_count']} "
                "cores): absolute times are inflated by other jobs, and n is small; ratios are rough.**", ""]
    elif busy:
        out += [f"**Caution: the machine was busy (load average {load:.2f} at the start on "
                f"{result['cpu_count']} cores).** Under oversubscription, implementations whose threads work "
                "inside each op (OpenMP: learn2learn, higher, torchopt, `innerloop-intraop`) slow down far more "
                "than innerloop's default, whose threads each run whole tasks; the default's ratio to "
                "learn2learn is then larger than on an idle machine. `innerloop-intraop` against learn2learn "
                "compares like with like.", ""]
    for order, name in (("second", "omniglot-2nd"), ("first", "omniglot-1st")):
        out.append(line(f"float32, {order} order, 2x learn2learn", _ratio(result, name, "innerloop"), 2,
                        "innerloop's default reaches"))
        intra = _ratio(result, name, "innerloop-intraop")
        if intra is not None:
            out.append(f"  (with the threads inside each op like the old libraries, `innerloop-intraop`: "
                       f"{intra:.2f}x)")
        tuned = _ratio(result, name, "innerloop", "learn2learn-malloc")
        if tuned is not None:
            out.append(f"  (against learn2learn given innerloop's malloc thresholds too, `learn2learn-malloc`: "
                       f"{tuned:.2f}x)")
    bf16 = "innerloop under bfloat16 autocast reaches"
    out.append(line("bfloat16 autocast, second order, 4x learn2learn",
                    _ratio(result, "omniglot-2nd", "innerloop-bf16"), 4, bf16))
    out.append(line("bfloat16 autocast, first order, 4x learn2learn",
                    _ratio(result, "omniglot-1st", "innerloop-bf16"), 4, bf16))
    for name in ("omniglot-2nd", "omniglot-1st", "omniglot-5step-2nd", "omniglot-20way-5step-2nd"):
        impls = result["settings"].get(name, {}).get("impls", {})
        if "innerloop" not in impls:
            continue
        mine = impls["innerloop"]["max_rss"]
        others = {k: v["max_rss"] for k, v in impls.items()
                  if not k.startswith("innerloop") and not k.endswith("-malloc") and v.get("times")}
        if others:
            lowest = min(others.values())
            verdict = "**met**" if mine <= lowest else "**not met**"
            theirs = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in others.items())
            out.append(f"- peak memory no higher than the old libraries' ({name}): {verdict}: innerloop "
                       f"{mine / GiB:.2f} GiB; {theirs}.")
    return [*out, ""]


def _sweep_tables(result: dict) -> list[str]:
    sweeps = result["sweeps"]
    out = ["## Scaling (few iterations per point: the shape, not the headline numbers)", ""]
    b = result.get("sweep_batch", 4)
    names = {"meta_batch": "meta-batch size (5-way 1-shot, 1 step, 2nd order)",
             "steps": f"inner steps (5-way 1-shot, meta-batch {b}, 2nd order)",
             "ways": f"ways (1-shot, meta-batch {b}, 1 step, 2nd order)",
             "memory_steps": "inner steps, memory: max RSS and time (5-way 1-shot, meta-batch 2; innerloop-1st is "
                             "first order, the rest second order)",
             "memory_steps_20way5shot": "inner steps, memory: max RSS and time (20-way 5-shot, 5 queries per "
                                        "class, meta-batch 1; innerloop-1st is first order, others second order)"}
    for axis, by_impl in sweeps.items():
        xs = sorted({p["x"] for pts in by_impl.values() for p in pts})
        header = "| implementation | " + " | ".join(f"{x:g}" for x in xs) + " |"
        out += [f"**{names.get(axis, axis)}**", "", header, "|---|" + "---|" * len(xs)]
        for impl, pts in by_impl.items():
            at = {p["x"]: p for p in pts}
            if axis.startswith("memory_steps"):
                cells = [f"{at[x]['max_rss'] / GiB:.2f} GiB, {_fmt_s(at[x]['median_s'])}" if x in at else "-"
                         for x in xs]
            else:
                cells = [_fmt_s(at[x]["median_s"]) if x in at else "-" for x in xs]
            out.append(f"| {impl} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _plots(result: dict, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = result.get("sweeps", {})
    files = []
    axes_time = [a for a in ("meta_batch", "steps", "ways") if a in sweeps]
    if axes_time:
        fig, axs = plt.subplots(1, len(axes_time), figsize=(4.2 * len(axes_time), 3.4), squeeze=False)
        labels = {"meta_batch": "meta-batch size", "steps": "inner steps", "ways": "ways"}
        for ax, axis in zip(axs[0], axes_time, strict=True):
            for impl, pts in sweeps[axis].items():
                ax.plot([p["x"] for p in pts], [p["median_s"] for p in pts], "o-", label=impl)
            ax.set_xlabel(labels[axis])
            ax.set_ylabel("s / meta-iteration")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        load = result["start"]["load"][0]
        fig.suptitle(f"MAML conv-4, 2nd order, {result['device']}, {result['threads']} thread(s), "
                     f"load average {load:.1f} at start", fontsize=10)
        fig.tight_layout()
        path = RESULTS / f"{tag}_scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    for axis in [a for a in sweeps if a.startswith("memory_steps")]:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for impl, pts in sweeps[axis].items():
            ax.plot([p["x"] for p in pts], [p["max_rss"] / GiB for p in pts], "o-", label=impl)
        ax.set_xlabel("inner steps")
        ax.set_ylabel("max RSS (GiB)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        what = "20-way 5-shot, meta-batch 1" if axis.endswith("20way5shot") else "5-way 1-shot, meta-batch 2"
        ax.set_title(f"MAML conv-4 {what}: memory vs inner steps", fontsize=9)
        fig.tight_layout()
        path = RESULTS / f"{tag}_{axis.replace('_steps', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def write(tag: str = "speed") -> Path:
    result = json.loads((RESULTS / f"{tag}.json").read_text())
    peak = result.get("peak", {})
    peak_conv = peak.get("conv_fp32")
    libs = ", ".join(f"{k} {v}" if v else f"{k} (not installed)" for k, v in result["libs"].items())
    lines = [
        "# MAML meta-training speed and memory: innerloop vs learn2learn, higher, torchopt",
        "",
        f"Command: `{result['command']}` (then `python benchmarks/speed/report.py --tag {tag}`), in the "
        "environment made by `bash benchmarks/speed/make_env.sh`.",
        "",
        f"Machine: {result.get('cpu', result['device'])}, {result['cpu_count']} cores; torch {result['torch']}; "
        f"{libs}; {result['threads']} threads; float32 unless said. Start {result['start']['time']}, load average "
        f"(1/5/15 min) {', '.join(f'{x:.2f}' for x in result['start']['load'])}; end {result['end']['time']}, "
        f"load average {', '.join(f'{x:.2f}' for x in result['end']['load'])}."
        + (" **Partial: the run was stopped before its last settings.**" if result.get("partial") else "")
        + (f" Workers ran with `MALLOC_MMAP_THRESHOLD_={result['mmap_threshold']}` (large tensors by mmap, "
           "returned to the system when freed: max RSS is the peak of live memory, not of a fragmented heap)."
           if result.get("mmap_threshold") else ""),
        "",
        "Each (implementation, setting) runs in its own fresh process (its max RSS is its own); the "
        "implementations are interleaved in rounds; times are medians over all timed meta-iterations "
        "(meta-gradient + Adam step) after a warm-up. The meta-gradient of each implementation for the same "
        "initial weights and batch is compared with innerloop's (relative error of the whole gradient vector) "
        "before timing. Images are random (a fixed seeded batch): speed does not depend on the pixels. "
        "learn2learn is imported with torchvision and gym stubbed (`benchmarks/speed/stubs.py`: placeholders for "
        "names its vision and gym sub-packages import; MAML uses neither), and built from its sdist with its C "
        "files regenerated by Cython 3.0 (the shipped ones do not compile on Python 3.11).",
        "",
        "## Machine peaks (measured in the same run)",
        "",
        *(["Best of 5 runs, measured at the start and at the end of the run; the higher of the two.", ""]
          if "peak_start" in result else ["Measured once, at the start of the run.", ""]),
        "| kernel | float32 GFLOP/s | bfloat16 GFLOP/s |",
        "|---|---|---|",
        f"| 3x3 conv 64->64, [128, 64, 28, 28], forward + backward | {peak.get('conv_fp32', 0) / 1e9:.0f} "
        f"| {peak.get('conv_bf16', 0) / 1e9:.0f} |",
        f"| matmul 2048^3 | {peak.get('matmul_fp32', 0) / 1e9:.0f} | {peak.get('matmul_bf16', 0) / 1e9:.0f} |",
        "",
        "## Implementations",
        "",
        *[f"- `{k}`: {v}" for k, v in result["impls"].items()],
        "",
        "## Results",
        "",
    ]
    for name, entry in result["settings"].items():
        lines += _table(name, entry, peak_conv)
    lines += _old_vs_new(result)
    lines += _verdict(result)
    if result.get("sweeps"):
        lines += _sweep_tables(result)
        files = _plots(result, tag)
        lines += [f"![{f}]({f})" for f in files] + [""]
    if tag == "speed" and NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    elif tag != "speed":
        lines += ["A secondary run: the headline numbers, verdict and findings are in [speed.md](speed.md).", ""]
    path = RESULTS / f"{tag}.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="speed")
    write(p.parse_args().tag)
