"""Diffusion library: schedules, objectives, samplers and EMA around `model_fn(x, t, context)`."""

from morphjax.diffusion.ema import ema_decay, ema_update
from morphjax.diffusion.objectives import (
    PARAMETERIZATIONS,
    diffusion_loss,
    drop_context,
    eps_and_x0,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    training_target,
    v_target,
)
from morphjax.diffusion.samplers import (
    ddim_invert,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    guided_prediction,
    sdedit,
)
from morphjax.diffusion.schedules import (
    MORPHDIFF_BETA_END,
    MORPHDIFF_BETA_START,
    Schedule,
    make_schedule,
    q_sample,
)

__all__ = [
    "MORPHDIFF_BETA_END", "MORPHDIFF_BETA_START", "PARAMETERIZATIONS", "Schedule", "ddim_invert",
    "ddim_sample", "ddim_timesteps", "ddpm_sample", "diffusion_loss", "drop_context", "ema_decay",
    "ema_update", "eps_and_x0", "guided_prediction", "make_schedule", "predict_eps_from_v",
    "predict_eps_from_x0", "predict_x0_from_eps", "predict_x0_from_v", "q_sample", "sdedit",
    "training_target", "v_target",
]
