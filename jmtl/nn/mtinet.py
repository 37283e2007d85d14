"""MTI-Net: multi-scale task interactions for dense prediction (Vandenhende et al. 2020)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jmtl.nn import _common

__all__ = ["MTINetOutput", "ConvBlock", "SpatialAttentionDistillation", "FeaturePropagation",
           "MTINet", "resize_to"]

BlockFactory = Callable[[int, int, nnx.Rngs], nnx.Module]


class MTINetOutput(NamedTuple):
    """Predictions of :class:`MTINet`.

    Attributes:
      initial: one ``{task: prediction}`` per scale, finest first: the initial task
        predictions (deep supervision targets, at each scale's resolution).
      final: ``{task: prediction}`` at the finest scale's resolution.
    """

    initial: tuple[dict[str, Any], ...]
    final: dict[str, Any]


def resize_to(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of a ``(B, H, W, C)`` map to ``(B, height, width, C)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jmtl import nn as mtnn
      >>> mtnn.resize_to(jnp.ones((1, 2, 2, 3)), 4, 4).shape
      (1, 4, 4, 3)
    """
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method="bilinear")


class ConvBlock(nnx.Module):
    """A residual block ``relu(conv3(relu(conv3(x))) + proj(x))`` on NHWC maps.

    ``proj`` is a 1x1 convolution when the channel counts differ, else the identity.
    The default block of :class:`MTINet`'s refinement and propagation stages (the
    official code uses ResNet basic blocks with batch norm; pass your own factory to
    :class:`MTINet` for those).

    Args:
      in_channels: input channels.
      out_channels: output channels.
      rngs: random streams for initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), rngs=rngs)
        self.proj = (nnx.Conv(in_channels, out_channels, (1, 1), rngs=rngs)
                     if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        skip = x if self.proj is None else self.proj(x)
        return jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))) + skip)


class SpatialAttentionDistillation(nnx.Module):
    """MTI-Net's multi-modal distillation: spatially gated messages between tasks.

    For task features ``F_t`` (``(B, H, W, C)``, one per task) it returns
    ``F_t + sum_{s != t} (W_{t<-s} * F_s) ⊙ sigmoid(A_{t<-s} * F_s)``, with ``W``
    and ``A`` 3x3 convolutions without bias: the attention mask is computed from
    the *sending* task's features (as in the official MTI-Net code), unlike
    :class:`MultiModalDistillation`, which gates with the receiving task's.

    Args:
      tasks: the task names.
      channels: ``C``.
      rngs: random streams for initialisation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jmtl import nn as mtnn
      >>> distill = mtnn.SpatialAttentionDistillation(["a", "b"], 4, rngs=nnx.Rngs(0))
      >>> distill({"a": jnp.ones((2, 3, 3, 4)), "b": jnp.zeros((2, 3, 3, 4))})["b"].shape
      (2, 3, 3, 4)

    References:
      Vandenhende, Georgoulis & Van Gool, "MTI-Net: Multi-Scale Task Interaction
      Networks for Multi-Task Learning", ECCV 2020.
    """

    def __init__(self, tasks: Sequence[str], channels: int, *, rngs: nnx.Rngs):
        self.task_names = _common.task_order(dict.fromkeys(tasks),
                                             what="SpatialAttentionDistillation: `tasks`")

        def conv():
            return nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)

        self.messages = nnx.Dict({t: nnx.Dict({s: conv() for s in self.task_names if s != t})
                                  for t in self.task_names})
        self.attention = nnx.Dict({t: nnx.Dict({s: conv() for s in self.task_names if s != t})
                                   for t in self.task_names})

    def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{task: distilled features}``, same shapes as the inputs."""
        _common.check_same_task_names(self.task_names, features,
                                      what="SpatialAttentionDistillation: `features`",
                                      reference="the module")
        out = {}
        for t in self.task_names:
            refined = features[t]
            for s in self.task_names:
                if s != t:
                    gate = jax.nn.sigmoid(self.attention[t][s](features[s]))
                    refined = refined + self.messages[t][s](features[s]) * gate
            out[t] = refined
        return out


class FeaturePropagation(nnx.Module):
    """MTI-Net's feature propagation module (FPM) at one scale.

    From task features ``F_t`` (``N`` tasks, ``C`` channels each) it forms the
    concatenation ``F`` (``N C`` channels), a per-task attention
    ``softmax_tasks(f(F))`` for every pixel and channel, the attended features
    reduced to ``C`` shared channels by ``g``, and for each task a
    squeeze-and-excitation of the shared features plus ``F_t`` (residual). The
    result is upsampled and passed to the next finer scale. ``f`` is two blocks
    (``N C -> N C / 4 -> N C / 4``) and a 1x1 convolution back to ``N C``; ``g`` one
    block (``N C -> C``), as in the official code. The attention groups the
    channels by task (the paper's description; the official code's reshape groups
    consecutive channels instead).

    Args:
      tasks: the task names.
      channels: ``C``, the channels of each task's features.
      rngs: random streams for initialisation.
      make_block: ``(in_channels, out_channels, rngs) -> module`` for ``f`` and
        ``g`` (default :class:`ConvBlock`).
      se_reduction: the squeeze-and-excitation bottleneck is ``max(C // r, 1)``
        (official ``r = 16``).

    References:
      Vandenhende, Georgoulis & Van Gool, "MTI-Net: Multi-Scale Task Interaction
      Networks for Multi-Task Learning", ECCV 2020; Hu, Shen & Sun,
      "Squeeze-and-Excitation Networks", CVPR 2018.
    """

    def __init__(self, tasks: Sequence[str], channels: int, *, rngs: nnx.Rngs,
                 make_block: BlockFactory | None = None, se_reduction: int = 16):
        self.task_names = _common.task_order(dict.fromkeys(tasks),
                                             what="FeaturePropagation: `tasks`")
        make_block = make_block or ConvBlock
        n = len(self.task_names)
        shared, narrow = n * channels, max(n * channels // 4, 1)
        self.attention_net = nnx.Sequential(make_block(shared, narrow, rngs),
                                            make_block(narrow, narrow, rngs),
                                            nnx.Conv(narrow, shared, (1, 1), rngs=rngs))
        self.reduce = make_block(shared, channels, rngs)
        hidden = max(channels // se_reduction, 1)
        self.squeeze = nnx.Dict({t: nnx.Linear(channels, hidden, rngs=rngs)
                                 for t in self.task_names})
        self.excite = nnx.Dict({t: nnx.Linear(hidden, channels, rngs=rngs)
                                for t in self.task_names})
        self.channels = channels

    def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{task: propagated features}``, same shapes as the inputs."""
        _common.check_same_task_names(self.task_names, features,
                                      what="FeaturePropagation: `features`",
                                      reference="the module")
        n = len(self.task_names)
        concat = jnp.concatenate([features[t] for t in self.task_names], axis=-1)
        lead = concat.shape[:-1]
        mask = jax.nn.softmax(self.attention_net(concat).reshape(*lead, n, self.channels),
                              axis=-2)
        attended = (mask.astype(concat.dtype)
                    * concat.reshape(*lead, n, self.channels)).reshape(concat.shape)
        shared = self.reduce(attended)
        pooled = jnp.mean(shared, axis=(1, 2))
        out = {}
        for t in self.task_names:
            scale = jax.nn.sigmoid(self.excite[t](jax.nn.relu(self.squeeze[t](pooled))))
            out[t] = shared * scale[:, None, None, :] + features[t]
        return out


class MTINet(nnx.Module):
    """Multi-scale task interaction network: initial predictions and distillation per scale.

    The backbone gives feature maps at ``S`` scales (NHWC, finest first, channels
    ``channels[s]``). From the coarsest scale to the finest, scale ``s`` refines
    its backbone features (concatenated with the features propagated from scale
    ``s + 1``, upsampled) into task features ``F_t^s`` (``channels[s]`` channels,
    one :class:`ConvBlock`-like refinement per task) and initial predictions
    ``P_t^s`` (a 1x1 convolution per task); a :class:`FeaturePropagation` module
    passes the ``F_t^s`` on to scale ``s - 1``. At every scale a
    :class:`SpatialAttentionDistillation` module exchanges information between
    the tasks' features; task ``t``'s head reads the distilled features of all
    scales, upsampled to the finest scale and concatenated
    (``sum(channels)`` channels), and gives the final prediction. Both the initial
    predictions (:attr:`MTINetOutput.initial`, to supervise as well, as the paper
    does, e.g. after upsampling them to the labels' size with :func:`resize_to`)
    and the final ones are returned.

    :meth:`encode` gives the backbone's multi-scale features (every backbone
    parameter is shared); :meth:`decode` runs everything after it. As for
    :class:`PADNet` the decoder is not task-separable (propagation and
    distillation mix the tasks), so in jmtl's features mode only the backbone is
    covered by the representation's Jacobian.

    Args:
      backbone: ``x -> [feature map per scale]``, finest first; consecutive scales
        of any size ratio (features are resized bilinearly).
      channels: the channels of the backbone's feature map at each scale.
      outputs: ``{task: channels of its prediction}``.
      rngs: random streams for initialisation.
      heads: optional ``{task: module}`` mapping the concatenated multi-scale
        features to the final prediction; default a 3x3 convolution to
        ``channels[0]``, a ReLU and a 1x1 convolution to ``outputs[task]``.
      make_block: ``(in_channels, out_channels, rngs) -> module`` for the
        refinement and propagation blocks (default :class:`ConvBlock`).
      se_reduction: squeeze-and-excitation reduction of the propagation modules.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jmtl import nn as mtnn
      >>> rngs = nnx.Rngs(0)
      >>> class Backbone(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fine = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      ...         self.coarse = nnx.Conv(4, 8, (3, 3), strides=2, rngs=rngs)
      ...     def __call__(self, x):
      ...         fine = nnx.relu(self.fine(x))
      ...         return [fine, nnx.relu(self.coarse(fine))]
      >>> model = mtnn.MTINet(Backbone(rngs), channels=[4, 8],
      ...                     outputs={"seg": 5, "depth": 1}, rngs=rngs)
      >>> out = model(jnp.ones((2, 8, 8, 3)))
      >>> out.initial[1]["seg"].shape, out.final["depth"].shape
      ((2, 4, 4, 5), (2, 8, 8, 1))

    References:
      Vandenhende, Georgoulis & Van Gool, "MTI-Net: Multi-Scale Task Interaction
      Networks for Multi-Task Learning", ECCV 2020.
    """

    def __init__(self, backbone: nnx.Module, channels: Sequence[int], outputs: Mapping[str, int],
                 *, rngs: nnx.Rngs, heads: Mapping[str, nnx.Module] | None = None,
                 make_block: BlockFactory | None = None, se_reduction: int = 16):
        self.task_names = _common.task_order(outputs, what="MTINet: `outputs`")
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"MTINet: `channels` must be positive, one per scale; got {channels}")
        self.channels = channels
        make_block = make_block or ConvBlock
        num_scales = len(channels)
        self.backbone = backbone
        self.refine = nnx.List([
            nnx.Dict({t: make_block(channels[s] + (channels[s + 1] if s + 1 < num_scales else 0),
                                    channels[s], rngs)
                      for t in self.task_names})
            for s in range(num_scales)])
        self.initial_heads = nnx.List([
            nnx.Dict({t: nnx.Conv(channels[s], outputs[t], (1, 1), rngs=rngs)
                      for t in self.task_names})
            for s in range(num_scales)])
        # propagate[s - 1] carries scale s's task features to scale s - 1.
        self.propagate = nnx.List([
            FeaturePropagation(self.task_names, channels[s], rngs=rngs, make_block=make_block,
                               se_reduction=se_reduction)
            for s in range(1, num_scales)])
        self.distill = nnx.List([SpatialAttentionDistillation(self.task_names, channels[s],
                                                              rngs=rngs)
                                 for s in range(num_scales)])
        if heads is None:
            total = sum(channels)
            heads = {t: nnx.Sequential(nnx.Conv(total, channels[0], (3, 3), rngs=rngs), nnx.relu,
                                       nnx.Conv(channels[0], outputs[t], (1, 1), rngs=rngs))
                     for t in self.task_names}
        else:
            _common.check_same_task_names(self.task_names, heads, what="MTINet: `heads`",
                                          reference="`outputs`")
        self.heads = _common.module_dict(self.task_names, heads)

    def encode(self, x: Any) -> tuple[jax.Array, ...]:
        """The backbone's feature maps, finest first (checked against ``channels``)."""
        features = tuple(self.backbone(x))
        got = tuple(f.shape[-1] for f in features)
        if got != self.channels:
            raise ValueError(f"MTINet: the backbone gives {len(features)} scales with channels "
                             f"{got}, the model was built for {self.channels}")
        return features

    def decode(self, features: Sequence[jax.Array]) -> MTINetOutput:
        """Initial predictions, propagation, distillation and final predictions."""
        features = tuple(features)
        if len(features) != len(self.channels):
            raise ValueError(f"MTINet: expected {len(self.channels)} scales of features, got "
                             f"{len(features)}")
        num_scales = len(features)
        task_features: list[dict[str, jax.Array]] = [{} for _ in range(num_scales)]
        initial: list[dict[str, jax.Array]] = [{} for _ in range(num_scales)]
        propagated = None
        for s in range(num_scales - 1, -1, -1):
            height, width = features[s].shape[1:3]
            for t in self.task_names:
                inp = features[s]
                if propagated is not None:
                    inp = jnp.concatenate([inp, resize_to(propagated[t], height, width)], -1)
                task_features[s][t] = self.refine[s][t](inp)
                initial[s][t] = self.initial_heads[s][t](task_features[s][t])
            if s > 0:
                propagated = self.propagate[s - 1](task_features[s])
        distilled = [self.distill[s](task_features[s]) for s in range(num_scales)]
        height, width = features[0].shape[1:3]
        final = {}
        for t in self.task_names:
            multi_scale = jnp.concatenate([resize_to(distilled[s][t], height, width)
                                           for s in range(num_scales)], axis=-1)
            final[t] = self.heads[t](multi_scale)
        return MTINetOutput(initial=tuple(initial), final=final)

    def __call__(self, x: Any) -> MTINetOutput:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))
