"""The objective a configuration trains, in words (torch-free: recipe dry runs print it anywhere)."""
from __future__ import annotations


def describe_objective(ratio: float, scope: str, norm: str, select: str, loss_agg_mode: str) -> str:
    """One line saying which objective these settings train (printed by dry runs and at start)."""
    if ratio >= 1.0:
        return (f"full-token DAPO: every response token, {loss_agg_mode} over the mini-batch "
                "(both scopes)")
    which = {"top": f"top-{ratio:.0%} highest-entropy", "bottom": f"bottom-{1 - ratio:.0%} "
             "lowest-entropy", "random": f"random {ratio:.0%}"}[select]
    denominator = "kept tokens" if norm == "kept_tokens" else "all response tokens"
    if scope == "global":
        return (f"{which} tokens of each mini-batch across data/context-parallel ranks (the "
                f"paper's scope); loss = {loss_agg_mode} over the mini-batch, dividing by "
                f"{denominator}")
    return (f"{which} tokens within each micro-batch (the seed code's scope); loss = each "
            f"micro-batch's mean over its {denominator}, weighted by its share of the "
            "mini-batch's sequences")
