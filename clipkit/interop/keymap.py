"""State-dict renaming between clipkit and another layout, both ways, from one table of template pairs.

Written by hand: timm converts OpenAI's visual towers one way only (``checkpoint_filter_fn``), transformers' CLIP
conversion is a script that needs OpenAI's ``clip`` package, and export needs the inverse. One table serves import
and export, so the two cannot disagree; ``tests/test_interop.py`` checks the tables against timm's converters.

A template names a key with placeholders: ``{i}`` matches one dotted part (``blocks.{i}.norm1.{p}``), ``{rest}``
any tail, and ``{qkv}`` marks the side that stores attention as three matrices (q, k, v) where the other side
stores one concatenated ``[3W, ...]`` matrix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Rule:
    """``ours`` <-> ``theirs``; ``transpose``: the two store the matrix transposed (OpenAI's ``x @ proj``)."""

    ours: str
    theirs: str
    transpose: bool = False

    @cached_property
    def patterns(self) -> tuple[re.Pattern, re.Pattern]:
        return _compile(self.ours), _compile(self.theirs)


def _compile(template: str) -> re.Pattern:
    out = re.escape(template)
    out = out.replace(r"\{rest\}", r"(?P<rest>.+)").replace(r"\{qkv\}", r"(?P<qkv>[qkv])")
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^.]+)", out) + "$")


def convert(state: dict[str, torch.Tensor], rules: list[Rule], to_theirs: bool) -> tuple[dict, list[str]]:
    """``state`` renamed by the first rule each key matches: (converted, keys no rule matched). Attention stored
    as q, k, v on one side is split from / concatenated into the other side's single matrix."""
    out, unmatched, pending = {}, [], {}
    for key, value in state.items():
        for rule in rules:
            source, target = (rule.ours, rule.theirs) if to_theirs else (rule.theirs, rule.ours)
            match = rule.patterns[0 if to_theirs else 1].match(key)
            if match is None:
                continue
            groups = match.groupdict()
            value = value.T if rule.transpose else value
            if "{qkv}" in target:  # one matrix -> three
                for name, part in zip(QKV, value.chunk(3), strict=True):
                    out[target.format(**groups, qkv=name)] = part
            elif "{qkv}" in source:  # three matrices -> one, once all three are here
                name = target.format(**groups)
                parts = pending.setdefault(name, {})
                parts[groups["qkv"]] = value
                if len(parts) == 3:
                    out[name] = torch.cat([parts[n] for n in QKV])
            else:
                out[target.format(**groups)] = value
            break
        else:
            unmatched.append(key)
    unmatched += [f"{k} (q, k or v missing)" for k, parts in pending.items() if len(parts) < 3]
    return out, unmatched


def fit_shapes(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> dict:
    """``state`` with every tensor reshaped to the model's own (``[W]`` -> ``[1, 1, W]`` for a class token), and
    exactly the model's keys: a missing, extra or differently sized tensor is an error naming it."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise ValueError(f"{what}: the weights do not fit the model (missing: {', '.join(missing[:5]) or 'none'}"
                         f"{' ...' if len(missing) > 5 else ''}; unexpected: {', '.join(extra[:5]) or 'none'}"
                         f"{' ...' if len(extra) > 5 else ''})")
    out = {}
    for key, value in state.items():
        shape = reference[key].shape
        if value.numel() != reference[key].numel():
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, the model's is {tuple(shape)}")
        out[key] = value.reshape(shape).to(reference[key].dtype).contiguous()
    return out


def convert_for(state: dict[str, torch.Tensor], rules: list[Rule], to_theirs: bool, model: nn.Module,
                source: str, target: str) -> dict:
    """``state`` converted by ``rules`` into ``model``'s state dict: every tensor placed (else an error naming the
    ones with no place), the model's own buffers (counters, position ids) where the source has none, and
    :func:`fit_shapes`."""
    converted, unmatched = convert(state, rules, to_theirs)
    if unmatched:
        raise ValueError(f"{len(unmatched)} tensors of {source} have no place in {target}: "
                         f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
    reference = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()}
    converted.update({k: v for k, v in reference.items() if k in buffers and k not in converted})
    return fit_shapes(converted, reference, target)
