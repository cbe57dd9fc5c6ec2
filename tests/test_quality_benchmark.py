"""`benchmarks/fmnist_quality.py`'s scheduler: a step marked ``alone`` (the compute match's timing runs) waits
for the running steps, gets every core, and nothing starts beside it; the other steps share the cores. And
the wall-clock match: a method beside MAE trains for MAE's images times its speed over MAE's, a speed timed
by `method_step_cost.py` in turns, from median step times. And each encoder's probes beside its own
architecture's at random init."""

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fmnist_quality as quality  # noqa: E402


@pytest.fixture
def recorded(monkeypatch):
    """Steps run as sleeps instead of ``mimkit`` commands; each one's (start, end, threads) is recorded."""
    spans: dict[str, tuple[float, float, int]] = {}
    lock = threading.Lock()

    def fake_mimkit(args: list[str], log: Path, threads: int, script: Path | None = None) -> int:
        start = time.perf_counter()
        time.sleep(float(args[1]))
        with lock:
            spans[args[0]] = (start, time.perf_counter(), threads)
        return 0

    monkeypatch.setattr(quality, "mimkit", fake_mimkit)
    monkeypatch.setattr(quality.os, "cpu_count", lambda: 4)
    return spans


def step(name: str, seconds: float, after: tuple[str, ...] = (), alone: bool = False) -> quality.Step:
    return quality.Step(name, [name, str(seconds)], after, alone)


def test_an_alone_step_waits_for_the_running_ones_and_runs_by_itself(recorded, tmp_path):
    steps = [step("long", 0.4), step("short", 0.1), step("timing", 0.2, after=("short",), alone=True),
             step("later", 0.1), step("reads-timing", 0.1, after=("timing",))]
    failed = quality.run_steps(steps, tmp_path, quality.Timings(tmp_path / "timings.json"), jobs=2)

    assert failed == [] and set(recorded) == {s.name for s in steps}
    start, end, threads = recorded["timing"]
    assert threads == 4  # every core
    for name, (other_start, other_end, _) in recorded.items():
        if name != "timing":
            assert other_end <= start or other_start >= end, f"{name} overlaps the timing step"
    assert recorded["timing"][0] >= recorded["long"][1]  # it waited for the long step to finish
    assert recorded["long"][2] == 2  # two steps at a time share the cores


def test_without_alone_steps_jobs_run_side_by_side(recorded, tmp_path):
    steps = [step("a", 0.3), step("b", 0.3)]
    quality.run_steps(steps, tmp_path, quality.Timings(tmp_path / "timings.json"), jobs=2)
    (a_start, a_end, _), (b_start, b_end, _) = recorded["a"], recorded["b"]
    assert a_start < b_end and b_start < a_end


def test_a_method_pretrains_for_the_wall_clock_of_mae(tmp_path):
    steps = {s.name: s for s in quality.wallclock_steps(tmp_path, "fashion-mnist", ["simmim", "cae"],
                                                         mae_epochs=10, quick=False, with_dvae=False)}
    assert list(steps) == ["dvae", "timing-simmim", "timing-cae", "simmim", "cae"]  # CAE reads a dVAE
    assert steps["timing-cae"].alone and steps["timing-cae"].after == ("dvae",)
    assert steps["timing-simmim"].script.name == "method_step_cost.py"
    speeds = {"images_per_s": {"mae": 300.0, "simmim": 150.0}, "train_images": 60000}
    (tmp_path / "timing-simmim.json").write_text(json.dumps(speeds))
    command = steps["simmim"].command()
    # half MAE's speed: half of MAE's 600,000 images in the same time, in steps of the recipe's batch 256
    assert command[command.index("--max-steps") + 1] == str(-(-300000 // 256))
    assert json.loads((tmp_path / "wallclock_match.json").read_text())["simmim"]["images"] == 300000
    cae_speeds = {**speeds, "images_per_s": {"mae": 300.0, "cae": 240.0}}
    (tmp_path / "timing-cae.json").write_text(json.dumps(cae_speeds))
    cae = steps["cae"].command()
    assert cae[cae.index("--tokenizer") + 1] == str(tmp_path / "dvae")


def test_a_method_with_a_teacher_distils_the_mae_run(tmp_path):
    steps = {s.name: s for s in quality.wallclock_steps(tmp_path, "fashion-mnist", ["maskdistill"],
                                                         mae_epochs=10, quick=True, with_dvae=False)}
    assert list(steps) == ["timing-maskdistill", "maskdistill"]
    timing = steps["timing-maskdistill"]
    assert timing.after == ("mae",)  # it reads the finished MAE run
    assert timing.command[timing.command.index("--set") + 1] == f"maskdistill.teacher={tmp_path / 'mae'}"
    speeds = {"images_per_s": {"mae": 300.0, "maskdistill": 200.0}, "train_images": 60000}
    (tmp_path / "timing-maskdistill.json").write_text(json.dumps(speeds))
    command = steps["maskdistill"].command()
    assert command[command.index("--teacher") + 1] == str(tmp_path / "mae")


def test_each_other_encoder_is_probed_beside_its_own_architecture_at_random_init(tmp_path):
    encoders = {"mae": tmp_path / "mae", "data2vec": tmp_path / "data2vec"}
    steps = quality.own_init_steps(tmp_path, "fashion-mnist", encoders, "avg")
    assert [s.name for s in steps] == [f"{verb}-data2vec-random-{label}" for label in ("100", "10", "1")
                                       for verb in ("linprobe", "knn")]  # MAE's is the baseline already
    probe = steps[2].command
    assert probe[:2] == ["linprobe", str(tmp_path / "data2vec")] and steps[2].after == ("data2vec",)
    assert probe[probe.index("--init") + 1] == "random"
    assert probe[probe.index("--label-fraction") + 1] == "0.1"
    assert probe[probe.index("--out") + 1] == str(tmp_path / "linprobe-data2vec-random-10")
    trained = {}
    for verb, offset in (("linprobe", 0.0), ("knn", 5.0)):
        for fraction, top1, random in ((1.0, 71.5, 40.0), (0.1, 67.25, 39.5), (0.01, 57.0, 37.0)):
            trained[(verb, fraction)] = {"mae": 90.0, "data2vec": top1 + offset}
            name = f"{verb}-data2vec-random-{quality.pct(fraction).rstrip('%')}"
            (tmp_path / name).mkdir()
            (tmp_path / name / "results.json").write_text(json.dumps({"test_top1": random}))
    table = quality.own_init_table(tmp_path, trained, encoders, quality.TITLES)
    assert table[0] == "| probe | labels | data2vec |"
    assert table[2:8] == ["| linear probe | 100% | 40.00 (+31.50) |",
                          "| linear probe | 10% | 39.50 (+27.75) |",
                          "| linear probe | 1% | 37.00 (+20.00) |", "| k-NN | 100% | 40.00 (+36.50) |",
                          "| k-NN | 10% | 39.50 (+32.75) |", "| k-NN | 1% | 37.00 (+25.00) |"]
    assert quality.own_init_table(tmp_path, trained, {"mae": tmp_path / "mae"}, quality.TITLES) == []


def test_records_added_from_many_threads_at_once_keep_every_key(tmp_path):
    """Two steps that start together each add their match to one record: none is lost, none reads it half
    written (the benchmark once stopped on a JSONDecodeError there)."""
    path = tmp_path / "wallclock_match.json"
    threads = [threading.Thread(target=lambda i=i: [quality.add_record(path, f"m{i}-{k}", {"steps": k})
                                                    for k in range(20)]) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(json.loads(path.read_text())) == 80


def test_step_costs_come_from_turns_of_blocks_and_median_step_times(monkeypatch, tmp_path):
    """`method_step_cost.py`: the methods take turns, ``--block`` steps each, the order reversed every other
    turn; a method's speed is its batch over its median step time, so one step slowed by a burst of load
    (here 50 s among 1 s steps) does not move it."""
    import method_step_cost as cost

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

        process_time = perf_counter

    clock, order = Clock(), []
    durations = {"mae": iter([1.0] * 3 + [1.0] * 6), "simmim": iter([2.0] * 3 + [2.0, 50.0] + [2.0] * 4)}

    def make_step(name, batch_size, data, overrides):
        def step():
            order.append(name)
            clock.now += next(durations[name])
        return step, name, 60_000

    monkeypatch.setattr(cost, "make_step", make_step)
    monkeypatch.setattr(cost, "time", clock)
    out = tmp_path / "speeds.json"
    cost.main(["--methods", "mae,simmim", "--batch-size", "8", "--turns", "3", "--block", "2",
               "--json", str(out)])
    timed = order[6:]  # after 3 warm-up steps each
    assert timed == ["mae"] * 2 + ["simmim"] * 2 + ["simmim"] * 2 + ["mae"] * 2 + ["mae"] * 2 + ["simmim"] * 2
    speeds = json.loads(out.read_text())
    assert speeds["images_per_s"] == {"mae": 8.0, "simmim": 4.0}
    assert speeds["images_per_cpu_s"]["simmim"] == pytest.approx(6 * 8 / 60.0)
    assert speeds["train_images"] == 60_000
