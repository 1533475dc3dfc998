"""Analysis of benchmarks/selection.py's runs: rank correlations of the validators with mIoU, each rule's regret, and
the leave-one-domain-out choice of a rule (numpy only; labels were read only to compute each candidate's mIoU)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from segadapt.adapt.selection import RULES, average_ranks, pick, signed_scores, verdict
from segadapt.adapt.validators import HIGHER_IS_BETTER

__all__ = ["analyse", "kendall", "print_analysis", "spearman"]


def spearman(x, y) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def kendall(x, y) -> float:
    """Kendall's tau-b."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    s, tx, ty = (dx * dy)[iu].sum(), (dx[iu] != 0).sum(), (dy[iu] != 0).sum()
    return float(s / np.sqrt(tx * ty)) if tx and ty else float("nan")


def _correlations(runs: List[dict]) -> Dict[str, Dict[str, float]]:
    """{validator: {spearman, kendall}} mean over runs, each validator signed so that + means 'agrees with mIoU'."""
    out: Dict[str, Dict[str, list]] = {}
    for r in runs:
        c = r["candidates"]
        names = list(c)
        miou = [c[n]["miou"] for n in names]
        for v in (*HIGHER_IS_BETTER, "mixval"):
            signed = signed_scores(c, v)
            vals = [signed.get(n, float("nan")) for n in names]
            if any(np.isnan(vals)):
                continue
            d = out.setdefault(v, {"spearman": [], "kendall": []})
            d["spearman"].append(spearman(vals, miou))
            d["kendall"].append(kendall(vals, miou))
    return {v: {k: float(np.nanmean(x)) for k, x in d.items()} for v, d in out.items()}


def _rule_outcomes(runs: List[dict]) -> Dict[str, dict]:
    """{rule: {regret, vs_source, worst_vs_source, picks}}: mean and worst over runs."""
    res = {}
    for rule in RULES:
        regret, vs_src, picks, signs = [], [], [], []
        for r in runs:
            c = r["candidates"]
            best = max(v["miou"] for v in c.values())
            p = pick(c, rule)
            regret.append(c[p.name]["miou"] - best)
            vs_src.append(c[p.name]["miou"] - c["source"]["miou"])
            picks.append(p.name)
            v = verdict(c, p, seed=r["seed"])
            true = c[p.name]["miou"] - c["source"]["miou"]
            signs.append(_verdict_ok(v.verdict, true))
        res[rule] = {"regret": float(np.mean(regret)), "worst_regret": float(np.min(regret)),
                     "vs_source": float(np.mean(vs_src)), "worst_vs_source": float(np.min(vs_src)),
                     "verdict_ok": float(np.mean(signs)), "picks": picks}
    return res


def _verdict_ok(v: str, true_gain: float) -> bool:
    """A verdict is right when its sign matches a true difference over 1 mIoU ('uncertain' is never wrong, and
    under 1 mIoU any verdict but a confident wrong sign is accepted)."""
    if v == "uncertain" or abs(true_gain) <= 1.0:
        return True
    return (v == "better") == (true_gain > 0)


def _verdict_outcomes(runs: List[dict], rule: str) -> Dict[str, dict]:
    """{"confidence@<c>": {right, cases, wrong_better, verdicts}} for the verdict at each of ``CONFIDENCES``: over
    the runs where the pick differs from the source model by more than 1 mIoU, the share whose verdict has the true
    sign (``uncertain`` counts as not right); ``wrong_better``: the share of all runs called ``better`` while the
    pick is below the source model."""
    out = {}
    for conf in CONFIDENCES:
        right, big, wrong, verdicts = 0, 0, 0, []
        for r in runs:
            c = r["candidates"]
            p = pick(c, rule)
            true = c[p.name]["miou"] - c["source"]["miou"]
            vd = verdict(c, p, conf, seed=r["seed"]).verdict
            verdicts.append(vd)
            if abs(true) > 1.0:
                big += 1
                right += vd == ("better" if true > 0 else "no better")
            wrong += vd == "better" and true < 0
        out[f"confidence@{conf:g}"] = {"right": right / big if big else float("nan"), "cases": big,
                                       "wrong_better": wrong / len(runs), "verdicts": verdicts}
    return out


#: verdict interval coverages tried
CONFIDENCES = (0.5, 0.8, 0.9, 0.95)
#: a rule is admissible on a domain when, in every run, its pick is at most this many mIoU below the best candidate
#: and below the source model (the tolerance the product is held to)
TOLERANCE = 0.5


def admissible(outcomes: Dict[str, dict]) -> List[str]:
    """The rules whose worst regret and worst loss against the source model are both within ``TOLERANCE``."""
    return [r for r, o in outcomes.items() if o["worst_regret"] >= -TOLERANCE and o["worst_vs_source"] >= -TOLERANCE]


def analyse(runs: List[dict]) -> dict:
    """Per domain: correlations, rule outcomes and the admissible rules; then leave-one-domain-out: the rules
    admissible on the other domain(s), each reported on this one (a choice on one domain cannot break a tie among
    rules that pick the same models there, so every tied rule is reported)."""
    domains = sorted({r["domain"] for r in runs})
    per = {}
    for d in domains:
        mine = [r for r in runs if r["domain"] == d]
        rules = _rule_outcomes(mine)
        per[d] = {"correlations": _correlations(mine), "rules": rules, "admissible": admissible(rules)}
    lodo = {}
    for d in domains:
        others = [o for o in domains if o != d]
        if not others:
            continue
        chosen = admissible(_rule_outcomes([r for r in runs if r["domain"] in others]))
        lodo[d] = {"chosen_on": others, "rules": chosen,
                   "outcomes": {k: per[d]["rules"][k] for k in chosen},
                   "admissible_here": [k for k in chosen if k in per[d]["admissible"]]}
    both = [r for r in RULES if all(r in per[d]["admissible"] for d in domains)]
    verdicts = {r: {d: _verdict_outcomes([x for x in runs if x["domain"] == d], r) for d in domains} for r in both}
    return {"domains": per, "leave_one_domain_out": lodo, "admissible_everywhere": both, "verdicts": verdicts}


def print_analysis(a: dict) -> None:
    for d, res in a["domains"].items():
        print(f"\n== {d}: validator vs mIoU (mean over seeds)")
        for v, c in sorted(res["correlations"].items(), key=lambda kv: -kv[1]["spearman"]):
            print(f"  {v:14s} spearman {c['spearman']:+.2f}  kendall {c['kendall']:+.2f}")
        print(f"== {d}: rules (regret = pick - best candidate; vs source)")
        for rule, o in sorted(res["rules"].items(), key=lambda kv: -kv[1]["regret"]):
            print(f"  {rule:22s} regret {o['regret']:+.2f} (worst {o['worst_regret']:+.2f})  vs source "
                  f"{o['vs_source']:+.2f} (worst {o['worst_vs_source']:+.2f})  verdict ok {o['verdict_ok']:.2f}  "
                  f"{' '.join(o['picks'])}")
    for d, lo in a["leave_one_domain_out"].items():
        print(f"LODO: admissible on {'+'.join(lo['chosen_on'])}: {len(lo['rules'])} rules; on {d} "
              f"{len(lo['admissible_here'])} of them are admissible too: {' '.join(lo['admissible_here'])}")
        for k, o in lo["outcomes"].items():
            print(f"   {k:22s} on {d}: regret {o['regret']:+.2f} (worst {o['worst_regret']:+.2f}), vs source "
                  f"{o['vs_source']:+.2f} (worst {o['worst_vs_source']:+.2f})")
    print(f"admissible on every domain: {' '.join(a['admissible_everywhere']) or 'none'}")
    for r, per in a["verdicts"].items():
        for d, vo in per.items():
            for k, o in vo.items():
                print(f"  verdict of {r} on {d} at {k}: right {o['right']:.2f} of {o['cases']} runs over 1 mIoU, "
                      f"'better' while worse {o['wrong_better']:.2f}: {' '.join(o['verdicts'])}")
