"""`moe-serve placement`: observed load from a real metrics exposition, plan + predicted imbalance."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import generate_latest

from serving.cli import main
from serving.metrics import EngineSample, MetricsHub, MetricsReport, observed_expert_load
from serving.model.checkpoint import write_checkpoint


def _skewed_hub() -> str:
    hub = MetricsHub()
    routed = {(layer, e, 0 if e < 2 else 1): (900 if e == 0 else 100) for layer in (0, 1) for e in range(4)}
    hub.apply(MetricsReport("engine-a", engine=EngineSample(routed_tokens=routed)))
    return generate_latest(hub.metrics.registry).decode()


def test_observed_expert_load_parses_the_hub_exposition():
    load = observed_expert_load(_skewed_hub(), num_experts=4)
    assert load == {0: [900.0, 100.0, 100.0, 100.0], 1: [900.0, 100.0, 100.0, 100.0]}


def test_placement_command_plans_from_scraped_load(tmp_path, capsys):
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "ck")        # 4 experts, 2 MoE layers
    body = _skewed_hub().encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert main(["placement", "--checkpoint", str(ckpt), "--expert-shards", "2",
                     "--metrics-url", url, "--json"]) == 0
    finally:
        server.shutdown()
    out = json.loads(capsys.readouterr().out)
    assert out["load_source"].startswith("observed")
    for layer in ("0", "1"):
        assert out["current_imbalance"][layer] > 1.5          # contiguous: shard 0 gets 1000 of 1200
        assert out["predicted_imbalance"][layer] < 1.25
        assert len(out["placement"]["copies"][layer][0]) == 2   # the hot expert is on both shards
    # the whole step: (1000 + 1000) busiest-shard tokens over (600 + 600) of the mean shard's
    assert abs(out["predicted_step_imbalance"]["current"] - 2000 / 1200) < 1e-9
    assert abs(out["predicted_step_imbalance"]["plan"] - max(out["predicted_imbalance"].values())) < 1e-9   # same layers
