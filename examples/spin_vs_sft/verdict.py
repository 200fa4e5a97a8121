"""Who did better, SPIN or continued SFT, with the seed-to-seed noise taken into account.

Each seed gives one paired difference d = SPIN − continued SFT of the final held-out exact match
(same fresh model, same start, same test problems). The verdict is the 95% confidence interval of
the mean difference, Student t with n − 1 degrees of freedom: a side wins only when the interval
excludes 0. The test problems are the same for every seed, so the interval covers training
randomness (initialisation, data order, sampling), not the choice of test problems; the binomial
standard error of one run's exact match is printed beside it for scale.
"""
import math

from seeds import mean_and_se

# Two-sided 95% quantiles of Student's t, by degrees of freedom (beyond 30: the normal's 1.96).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
        26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t_quantile_95(degrees_of_freedom):
    return T_95.get(degrees_of_freedom, 1.96)


def compare(spin_finals, sft_finals):
    """{winner: "spin" | "sft" | "neither" | None, mean_diff, se, low, high, ...} of paired per-seed values.

    winner is None with a single seed (no noise estimate, no verdict).
    """
    if len(spin_finals) != len(sft_finals) or not spin_finals:
        raise ValueError(f"need one SPIN and one continued-SFT value per seed, got {len(spin_finals)} and "
                         f"{len(sft_finals)}")
    n = len(spin_finals)
    diffs = [a - b for a, b in zip(spin_finals, sft_finals)]
    spin_mean, spin_se = mean_and_se(spin_finals)
    sft_mean, sft_se = mean_and_se(sft_finals)
    mean_diff, se = mean_and_se(diffs)
    result = {"seeds": n, "spin_mean": spin_mean, "spin_se": spin_se, "sft_mean": sft_mean, "sft_se": sft_se,
              "mean_diff": mean_diff, "se": se, "low": None, "high": None, "winner": None}
    if n < 2:
        return result
    half_width = t_quantile_95(n - 1) * se
    result["low"], result["high"] = mean_diff - half_width, mean_diff + half_width
    result["winner"] = "spin" if result["low"] > 0 else "sft" if result["high"] < 0 else "neither"
    return result


def verdict(spin_finals, sft_finals, *, num_test, steps):
    """(winner, text): the comparison of the final exact matches, one value per seed, paired by seed."""
    c = compare(spin_finals, sft_finals)
    binomial = math.sqrt(max(c["spin_mean"] * (1 - c["spin_mean"]), c["sft_mean"] * (1 - c["sft_mean"])) / num_test)

    def pm(mean, se):
        return f"{mean:.3f}" + ("" if se is None else f" ± {se:.3f}")

    text = (f"After {steps} optimizer steps each, held-out exact match over {c['seeds']} seed(s) (mean ± standard "
            f"error): SPIN {pm(c['spin_mean'], c['spin_se'])}, continued SFT {pm(c['sft_mean'], c['sft_se'])}; "
            f"paired difference SPIN − SFT {c['mean_diff']:+.3f}")
    if c["winner"] is None:
        return None, text + (". One seed gives no estimate of the noise: no verdict (run more seeds).")
    text += (f" ± {c['se']:.3f}, 95% interval [{c['low']:+.3f}, {c['high']:+.3f}] (Student t, {c['seeds'] - 1} "
             f"degrees of freedom; one run's binomial standard error on these {num_test} test problems is "
             f"about {binomial:.3f}). ")
    if c["winner"] == "spin":
        text += "Verdict: SPIN did better; the interval excludes 0."
    elif c["winner"] == "sft":
        text += "Verdict: continued SFT did better; the interval excludes 0."
    else:
        text += ("Verdict: no difference is measurable; the interval includes 0 (the gap is within the "
                 "seed-to-seed noise).")
    return c["winner"], text
