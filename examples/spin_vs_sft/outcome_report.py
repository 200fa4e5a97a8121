"""The text of benchmarks/results/outcome.md from the per-(task, seed) results of study_outcome.py."""
from comparison import START_NAMES, TASKS, choose_run, validation_score
from seeds import mean_and_se
from verdict import compare, verdict

VERDICTS = {"spin": "SPIN better", "sft": "continued SFT better", "neither": "no measurable difference"}


def pm(values, digits=3, sign=""):
    mean, se = mean_and_se(values)
    return f"{mean:{sign}.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def mean_of(values, fmt):
    values = [v for v in values if v is not None]
    return "-" if not values else fmt.format(sum(values) / len(values))


def best_on_average(starts, kind):
    """The grid point of `kind` with the best final validation exact match averaged over the seeds
    (ties: lower mean validation loss)."""
    points = [(r["lr"], r["beta"]) for r in starts[0]["runs"] if r["arm"] == kind]

    def final_rows(point):
        return [next(r for r in s["runs"] if r["arm"] == kind and (r["lr"], r["beta"]) == point)["rows"][-1]
                for s in starts]

    lr, beta = max(points, key=lambda p: validation_score(final_rows(p)))
    return {"lr": lr, "beta": beta}


def setting_section(task, kind, per_seed, grid):
    """(markdown lines, summary row, comparison) of one (task, start) over its seeds."""
    starts = [r["starts"][kind] for r in per_seed]
    sft = [choose_run(s["runs"], "sft") for s in starts]
    spin = [choose_run(s["runs"], "spin") for s in starts]
    num_test = TASKS[task].test_size()
    steps = spin[0]["rows"][-1]["step"]
    sft_final = [r["rows"][-1]["exact_match"] for r in sft]
    spin_final = [r["rows"][-1]["exact_match"] for r in spin]
    winner, text = verdict(spin_final, sft_final, num_test=num_test, steps=steps)
    result = compare(spin_final, sft_final)
    seeds = [r["seed"] for r in per_seed]
    start_steps = ", ".join(f"{s['step']}" + (f" (stopped {s['stopped_at']})" if s["stopped_at"] != s["step"] else "")
                            for s in starts)
    lines = [f"### {task}, {START_NAMES[kind]}", "",
             f"Start: {start_steps} SFT steps (seeds {seeds}); test exact match "
             f"{pm([s['exact_match'] for s in starts])}, validation loss {pm([s['val_sft_loss'] for s in starts], 4)}.",
             "Chosen on validation exact match, per seed: continued SFT lr "
             + ", ".join(f"{r['lr']:g}" for r in sft) + "; SPIN (lr, β) "
             + ", ".join(f"({r['lr']:g}, {r['beta']:g})" for r in spin) + ".", "",
             "| iter | step | continued SFT test EM | SPIN test EM | SPIN − SFT | SFT val loss: SFT / SPIN "
             "| SPIN acc start → end | margin start → end | gen = gold |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, sft_row in enumerate(sft[0]["rows"]):
        a = [r["rows"][i] for r in sft]
        b = [r["rows"][i] for r in spin]

        def spin_mean(key, fmt):
            return mean_of([y[key] for y in b], fmt)

        diffs = [y["exact_match"] - x["exact_match"] for x, y in zip(a, b)]
        lines.append(
            f"| {sft_row['iteration']} | {sft_row['step']} | {pm([x['exact_match'] for x in a])} "
            f"| {pm([y['exact_match'] for y in b])} | {pm(diffs, sign='+')} "
            f"| {mean_of([x['val_sft_loss'] for x in a], '{:.4f}')} / {spin_mean('val_sft_loss', '{:.4f}')} "
            f"| {spin_mean('spin_acc_start', '{:.2f}')} → {spin_mean('spin_acc_end', '{:.2f}')} "
            f"| {spin_mean('margin_start', '{:+.3f}')} → {spin_mean('margin_end', '{:+.3f}')} "
            f"| {spin_mean('gen_equals_gold', '{:.3f}')} |")
    best = {kind: best_on_average(starts, kind) for kind in ("sft", "spin")}
    lines += ["", text, "",
              f"Best on average over the seeds (the demo's choice): continued SFT lr {best['sft']['lr']:g}; SPIN lr "
              f"{best['spin']['lr']:g}, β {best['spin']['beta']:g}.", "",
              "<details><summary>Grid: final validation exact match (mean over seeds; the test "
              "split plays no part)</summary>", "", "| arm | lr | β | val exact match | chosen for seeds |",
              "|---|---|---|---|---|"]
    for point in grid:
        finals = [next(r for r in s["runs"] if r["arm"] == point["kind"] and r["lr"] == point["lr"]
                       and r["beta"] == point["beta"])["rows"][-1]["val_exact_match"] for s in starts]
        chosen = [seed for seed, s, c in zip(seeds, starts, (sft if point["kind"] == "sft" else spin))
                  if c["lr"] == point["lr"] and c["beta"] == point["beta"]]
        beta = "-" if point["beta"] is None else f"{point['beta']:g}"
        lines.append(f"| {point['kind']} | {point['lr']:g} | {beta} | {pm(finals)} | {chosen or ''} |")
    lines += ["", "</details>", ""]
    summary = (f"| {task} | {START_NAMES[kind]} | {start_steps} | {pm([s['exact_match'] for s in starts])} "
               f"| {pm(sft_final)} | {pm(spin_final)} | {result['mean_diff']:+.3f}"
               + ("" if result["low"] is None else f" [{result['low']:+.3f}, {result['high']:+.3f}]")
               + f" | {VERDICTS.get(winner, 'one seed: none')} |")
    return lines, summary, result


def report_markdown(results, meta):
    """The study's report (outcome.md) from its raw results and run metadata."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    kinds = [kind for kind in START_NAMES if kind in results[0]["starts"]]   # (the raw JSON sorts its keys)
    p = meta["protocol"]
    cpu = sum(r["cpu_seconds"] for r in results)
    header = [
        "# SPIN vs continued SFT on the built-in tasks (CPU study)", "",
        f"Command: `{meta['command']}`" + (f" (code: commit {meta['code']})" if meta.get("code") else ""), "",
        f"Ran in {meta['seconds'] / 60:.1f} minutes with {meta['workers']} worker process(es) of one thread on "
        f"{meta['cpus']} CPU cores (load average before {meta['load_before'][0]:.2f}, after "
        f"{meta['load_after'][0]:.2f}; Python {meta['python']}). The units used {cpu / 60:.1f} CPU minutes in all "
        f"(the longest {max(r['cpu_seconds'] for r in results) / 60:.1f}): on idle cores, {meta['workers']} "
        f"worker(s) would take about {cpu / 60 / meta['workers']:.1f} minutes.", "",
        "Protocol: a fresh tiny Llama per seed; SFT at lr " + f"{p['start_lr']:g}, batch {p['batch_size']}, "
        f"gives both starts: the short warm-up (its first steps) and convergence (validation loss checked every "
        f"{p['eval_every']} steps, stopped after {p['patience']} checks without a new lowest value, best weights "
        f"kept). From each start both arms train on the first {p['spin_prompts']} training prompts for "
        f"{p['iterations']} iterations' worth of optimizer steps at batch {p['batch_size']}: SPIN one epoch of "
        f"pairs per iteration (responses sampled at temperature {p['temperature']:g}), continued SFT the same "
        "number of steps on the gold responses: equal steps, equal examples seen. Each arm's learning rate (and "
        "β for SPIN) is chosen per seed from the grid below by the final validation exact match; the test split "
        "is only reported. Test exact match: greedy decoding, the whole response (EOS included) must equal the "
        "gold one. ± is the standard error over seeds; the interval is the paired 95% t interval of SPIN − SFT.",
        "", "## Summary", "",
        "| task | start | start SFT steps per seed | start test EM | continued SFT final | SPIN final "
        "| SPIN − SFT [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|"]
    sections, comparisons = [], []
    for task in tasks:
        per_seed = [r for r in results if r["task"] == task]
        for kind in kinds:
            lines, summary, result = setting_section(task, kind, per_seed, meta["grid"])
            header.append(summary)
            sections += lines
            comparisons.append((task, kind, result))
    wins = [(t, k, r) for t, k, r in comparisons if r["winner"] == "spin"]
    if wins:
        task, kind, r = max(wins, key=lambda w: w[2]["low"])
        closing = (f"Clearest SPIN effect: {task}, {START_NAMES[kind]} (SPIN − SFT {r['mean_diff']:+.3f}, "
                   f"interval [{r['low']:+.3f}, {r['high']:+.3f}]).")
    else:
        task, kind, r = max(comparisons, key=lambda c: c[2]["mean_diff"])
        closing = (f"SPIN beat continued SFT in no setting. Closest: {task}, {START_NAMES[kind]} "
                   f"(SPIN − SFT {r['mean_diff']:+.3f}).")
    header += ["", closing, "", "## Per setting", ""]
    return "\n".join(header + sections) + "\n"
