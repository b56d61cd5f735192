"""Process-group helpers. Under DDP every rank trains the same task at each step: rank 0 draws,
the others receive.

Two real gloo processes on this machine. Each rank seeds its chooser differently, so without the
broadcast their draws would disagree (checked too)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vlframe.engine.trainer import TaskChooser

        mix = {"mlm": 2, "itm": 2, "mrfr": 1, "mrc_kl": 1}
        chooser = TaskChooser(mix, seed=1234 + rank)  # deliberately different per rank
        chosen = [chooser.choose() for _ in range(60)]
        # What this rank would have drawn on its own (no broadcast), for the contrast.
        own = TaskChooser(mix, seed=1234 + rank)
        own_draws = [own.names[int(torch.multinomial(own.weights, 1, generator=own.generator))] for _ in range(60)]
        torch.save({"chosen": chosen, "own": own_draws}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_ranks_train_the_same_task(tmp_path):
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["chosen"] == r1["chosen"]
    assert r0["chosen"] == r0["own"], "rank 0's own draws are what everyone trains"
    assert r0["own"] != r1["own"], "without the broadcast the ranks would disagree"
    assert set(r0["chosen"]) == {"mlm", "itm", "mrfr", "mrc_kl"}


def test_task_phases_replace_the_mix_until_their_step():
    import pytest

    from vlframe.engine.trainer import TaskChooser

    c = TaskChooser({"mlm": 2, "itm": 2, "mrfr": 1}, seed=0, phases=[{"until_step": 50, "mix": {"itm": 1}}])
    early = [c.choose(s) for s in range(50)]
    late = [c.choose(s) for s in range(50, 400)]
    assert set(early) == {"itm"}
    assert set(late) == {"mlm", "itm", "mrfr"} and 0.3 < late.count("mlm") / len(late) < 0.5
    with pytest.raises(ValueError, match=r"train.phases\[0\].mix: unknown task"):
        TaskChooser({"mlm": 1}, seed=0, phases=[{"until_step": 5, "mix": {"itm": 1}}])
    with pytest.raises(ValueError, match=r"train.phases\[1\].until_step must increase"):
        TaskChooser({"mlm": 1}, seed=0, phases=[{"until_step": 5, "mix": {"mlm": 1}}, {"until_step": 5, "mix": {"mlm": 1}}])


def test_incomplete_launcher_environment_is_named(monkeypatch):
    import pytest

    from vlframe.engine import distributed as D

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but MASTER_ADDR not set"):
        D.init_from_env(torch.device("cpu"))
    assert not D.is_dist()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no group, every helper a no-op
    assert D.init_from_env(torch.device("cpu")) is False
    assert (D.rank(), D.world_size(), D.any_rank(torch.tensor(True)), D.gather_to_main({"a": 1})) == (0, 1, True, [{"a": 1}])
