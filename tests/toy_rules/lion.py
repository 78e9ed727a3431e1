"""Lion (Chen et al. 2023), written as a user would add a rule: this one file, nothing else.

    c = beta1 * m + (1 - beta1) * g
    p <- p * (1 - lr * weight_decay) - lr * sign(c)
    m <- beta2 * m + (1 - beta2) * g
"""

import torch

from lightning_optlab.optim import RuleOptimizer, UpdateRule, register_rule
from lightning_optlab.optim.registry import check_common


def lion_step(group, params, grads, states):
    beta1, beta2 = group["betas"]
    for p, g, state in zip(params, grads, states):
        if "exp_avg" not in state:  # in the parameter's dtype, as torch's load_state_dict casts it
            state["exp_avg"] = torch.zeros_like(p)
        m, g32 = state["exp_avg"].float(), g.float()
        update = torch.lerp(g32, m, beta1).sign_()  # beta1*m + (1-beta1)*g
        p.copy_(p.float().mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"]))
        state["exp_avg"].copy_(m.lerp_(g32, 1 - beta2))


register_rule(
    UpdateRule(
        name="lion",
        step=lion_step,
        defaults={"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
        summary="Lion: sign of an interpolated momentum, decoupled weight decay",
        check=check_common,
        example={"lr": 1e-3, "weight_decay": 0.1},
    )
)


class Lion(RuleOptimizer):
    rule_name = "lion"
