"""The fleet simulator (no Ray): deterministic, and our policy beats Ray's default on a spike."""
import argparse
import json

import numpy as np
import pytest

from serving.autoscaling.calibration import Calibration, add_calibrate_arguments
from serving.autoscaling.simulator import (FleetConfig, add_simulate_arguments, compare, our_policy,
                                           ray_default_policy, run_simulate, simulate)
from serving.autoscaling.traces import build_trace, csv_trace, diurnal_trace, poisson_trace, spike_trace

CAL = Calibration(decode_step_base_s=0.03, decode_step_per_seq_s=0.005, prefill_s_per_token=0.0008, max_batch=16,
                  replica_cold_start_s=5.0, prompt_tokens_mean=64, output_tokens_mean=64)


def _spike(gpus=200, dt=0.5):
    base = 0.8 * gpus * CAL.replica_rps(12) / 10
    return spike_trace(base, dt_s=dt, warmup_s=120, spike_s=180, cooldown_s=300)


def test_traces_have_the_promised_shape(tmp_path):
    tr = spike_trace(10.0, dt_s=1.0, warmup_s=10, spike_s=5, cooldown_s=10)
    assert tr.rate()[:10].tolist() == [10.0] * 10 and tr.rate()[10:15].tolist() == [100.0] * 5
    assert tr.rate()[15:].tolist() == [10.0] * 10 and tr.duration_s == 25
    d = diurnal_trace(100.0, dt_s=1.0, duration_s=100, period_s=100, peak_to_trough=4)
    assert d.rate().max() / d.rate().min() == pytest.approx(4, rel=0.02)
    assert (poisson_trace(50, duration_s=60, seed=1).arrivals == poisson_trace(50, duration_s=60, seed=1).arrivals).all()
    p = tmp_path / "arrivals.csv"
    p.write_text("timestamp,priority\n100.0,interactive\n100.2,batch\n101.7,interactive\n103.9,interactive\n")
    c = csv_trace(p, dt_s=1.0)
    assert c.arrivals.tolist() == [2, 1, 0, 1] and c.batch_share == 0.25
    assert build_trace(str(p), base_rps=1, dt_s=1.0).total == 4


def test_simulation_is_deterministic():
    fleet = FleetConfig(gpus=200)
    tr = _spike()
    a = simulate(tr, our_policy(fleet, CAL), CAL, fleet)
    b = simulate(tr, our_policy(fleet, CAL), CAL, fleet)
    assert a.metrics == b.metrics
    assert all(np.array_equal(a.timeline[k], b.timeline[k]) for k in a.timeline)


def test_ours_beats_ray_default_on_a_spike_with_fewer_gpu_hours():
    fleet = FleetConfig(gpus=200)
    res = compare(_spike(), CAL, fleet)
    ours, ray = res["ours"].metrics, res["ray_default"].metrics
    assert ours["slo_attainment"] > ray["slo_attainment"]
    assert ours["gpu_hours"] <= ray["gpu_hours"]
    assert 0 <= ours["seconds_to_first_upscale"] <= 2.0          # reacts within a couple of seconds
    assert ray["seconds_to_first_upscale"] >= 30.0                 # upscale_delay_s
    assert ours["final_replicas"] < ours["peak_replicas"]          # and comes back down
    assert ours["unserved"] == 0                                   # admitted work all completes
    # conservation: every request is either served or shed
    assert ours["served"] + ours["shed"] == pytest.approx(ours["requests"], rel=1e-6)


def test_ray_default_baseline_uses_rays_defaults():
    spec = ray_default_policy(FleetConfig(gpus=10))
    s = spec.serve
    assert (s.target_ongoing_requests, s.upscale_delay_s, s.downscale_delay_s, s.metrics_interval_s,
            s.look_back_period_s, s.get_upscaling_factor(), s.get_downscaling_factor()) == (2, 30, 600, 10, 30, 1, 1)
    assert s.record_interval_s == 6.0


def test_calibration_json_round_trip(tmp_path):
    p = CAL.save(tmp_path / "c.json")
    assert Calibration.load(p) == CAL
    assert CAL.decode_step_s(10) == pytest.approx(0.08)
    assert CAL.replica_rps(16) == pytest.approx(16 / CAL.service_s(16))
    shipped = Calibration.default()          # cluster/calibration.json, measured on this machine
    assert shipped.max_batch >= 1 and shipped.decode_step_base_s > 0 and shipped.replica_cold_start_s > 0


def test_cli_prints_one_json_object_and_a_plot(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_simulate_arguments(p)
    cal = CAL.save(tmp_path / "cal.json")
    png = tmp_path / "sim.png"
    args = p.parse_args(["--trace", "spike", "--gpus", "100", "--calibration", str(cal), "--duration-s", "400",
                         "--dt-s", "0.5", "--plot", str(png), "--json"])
    assert run_simulate(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"] == "spike" and out["gpus"] == 100
    for name in ("ours", "ray_default"):
        assert {"slo_attainment", "shed_ratio", "ttft_p99_s", "gpu_hours"} <= set(out["policies"][name])
    assert png.stat().st_size > 10_000
    c = argparse.ArgumentParser()
    add_calibrate_arguments(c)
    assert c.parse_args(["--out", "x.json"]).size == "small"
