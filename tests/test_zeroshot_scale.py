"""Zero-shot at scale (issue 20, item 2): class prompts go through the text tower once per set, in chunks of
``text_batch_size``, however many chunks of images are scored; the contrastive classifier is open_clip's; under DDP
each rank scores its share of the images and the gathered scores are one process's."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from callbacks.zeroshot import ZeroShotEvaluation
from clipkit.evaluation.suite import gather_rows, rank_rows, scores

C, T, L = 7, 3, 8


def random_prompts(c: int = C, t: int = T, length: int = L, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (c, t, length), generator=g)
    mask = (torch.arange(length) < torch.randint(3, length + 1, (c, t, 1), generator=g)).long()
    ids[..., 0] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def objective():
    from clipkit.config import compose_config
    from tests.conftest import TINY

    torch.manual_seed(0)
    return instantiate(compose_config([*TINY, "data.supersample=1"]).objective).eval()


class Counter:
    """Counts a module's forward calls and the rows they were given."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls, self.rows = 0, 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1
        self.rows += len(args[0])


def test_prompts_are_encoded_once_in_text_batches_whatever_the_number_of_image_chunks(objective):
    images, prompts = torch.randn(10, 3, 32, 32), random_prompts()
    whole = scores(objective, images, prompts, "cpu", batch_size=10, text_batch_size=None)
    text = Counter(objective.text_tower)
    try:
        chunked = scores(objective, images, prompts, "cpu", batch_size=2, text_batch_size=4)  # 5 image chunks
    finally:
        text.handle.remove()
    assert (text.calls, text.rows) == (-(-C * T // 4), C * T)  # 6 passes, each prompt once
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_contrastive_classifier_is_open_clips_on_random_weights(objective):
    """open_clip's ``build_zero_shot_classifier`` (normalised prompt embeddings, averaged, renormalised) is the
    reference; our ``[C, D]`` is its ``[D, C]`` transposed, in any text batch size."""
    from open_clip import build_zero_shot_classifier

    prompts = random_prompts()
    rows = {i: (prompts["input_ids"][i // T, i % T], prompts["attention_mask"][i // T, i % T]) for i in range(C * T)}

    class Model:  # open_clip's model contract on our towers; a "text" is a prompt's row index
        def encode_text(self, texts, normalize=True):
            ids, mask = (torch.stack([rows[int(i)][k] for i in texts]) for k in (0, 1))
            return objective.encode_text(ids, mask)

    templates = [lambda c, t=t: str(int(c) * T + t) for t in range(T)]  # class c, template t -> its row
    reference = build_zero_shot_classifier(Model(), lambda texts: torch.tensor([int(t) for t in texts]),
                                           [str(c) for c in range(C)], templates, num_classes_per_batch=3)
    with torch.no_grad():
        for text_batch_size in (None, 5):
            ours = objective.zero_shot_classifier(prompts, text_batch_size)
            torch.testing.assert_close(ours, reference.T, atol=1e-6, rtol=1e-5)
        images = torch.randn(4, 3, 32, 32)
        expected = objective.logit_scale.exp() * objective.encode_image(images) @ reference
        torch.testing.assert_close(objective.zero_shot_logits(images, ours), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,world", [(10, 2), (7, 3), (2, 3)])
def test_rank_shares_cover_every_row_once_and_gather_back_in_order(n, world):
    shares = [range(n)[rank_rows(n, r, world)] for r in range(world)]
    assert [i for share in shares for i in share] == list(range(n))
    full = torch.arange(n * 2, dtype=torch.float).reshape(n, 2)
    locals_ = [full[rank_rows(n, r, world)] for r in range(world)]
    padded = []

    def all_gather(t):  # what every rank would receive: each rank's padded share, stacked
        padded.append(t)
        most = max(len(x) for x in locals_)
        return torch.stack([torch.cat([x, x.new_zeros(most - len(x), 2)]) for x in locals_])

    for r in range(world):
        assert torch.equal(gather_rows(locals_[r], n, world, all_gather), full)
    assert len({tuple(t.shape) for t in padded}) == 1  # the same shape on every rank, as all_gather requires


def fake_rank(rank: int, world: int, datamodule, objective, slots: list, barrier: threading.Barrier):
    """The trainer and module a rank's callback sees; ``all_gather`` meets the other ranks' threads."""

    def all_gather(t):
        slots[rank] = t
        barrier.wait()
        out = torch.stack(list(slots))
        barrier.wait()
        return out

    trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=1, datamodule=datamodule, loggers=[],
                              callback_metrics={}, is_global_zero=rank == 0,
                              precision_plugin=SimpleNamespace(forward_context=torch.no_grad))
    module = SimpleNamespace(objective=objective, device=torch.device("cpu"), images_seen=0, all_gather=all_gather,
                             named_modules=objective.named_modules)  # full_params looks for FSDP units (none here)
    return trainer, module


def test_two_ranks_each_score_half_the_images_and_log_one_processs_metrics(objective, tiny_cfg):
    datamodule = instantiate(tiny_cfg().data)
    single_trainer, single_module = fake_rank(0, 1, datamodule, objective, [None], threading.Barrier(1))
    expected = ZeroShotEvaluation(batch_size=8).evaluate(single_trainer, single_module)

    world, slots, barrier = 2, [None, None], threading.Barrier(2)
    seen: dict[int, int] = {}
    results: dict[int, dict] = {}
    lock = threading.Lock()

    def count(module, args):
        with lock:
            seen[threading.get_ident()] = seen.get(threading.get_ident(), 0) + len(args[0])

    def rank(r):
        results[r] = ZeroShotEvaluation(batch_size=8).evaluate(*fake_rank(r, world, datamodule, objective, slots,
                                                                           barrier))

    handle = objective.image_tower.register_forward_pre_hook(count)
    try:
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        handle.remove()
    sizes = [len(s.images) for s in (*datamodule.validation_sets(), *datamodule.zeroshot_sets(),
                                     *datamodule.retrieval_sets())]
    shares = [sum(len(range(n)[rank_rows(n, r, world)]) for n in sizes) for r in range(world)]
    assert sorted(seen.values()) == sorted(shares) and sum(shares) == sum(sizes)  # each rank its half, not all
    for r in range(world):
        assert results[r].keys() == expected.keys()
        assert results[r] == pytest.approx(expected, abs=1e-6), r
