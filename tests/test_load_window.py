from serving.engine.load_window import LoadWindow


def test_rates_and_quantiles_over_a_sliding_window():
    now = [0.0]
    w = LoadWindow(window_s=2.0, clock=lambda: now[0])
    for i in range(10):
        w.add("arrivals")
        w.add("ttft_s", 0.1 * (i + 1))
        now[0] += 0.1
    assert w.rate("arrivals") == 5.0                 # 10 events in a 2 s window
    assert abs(w.quantile("ttft_s", 0.9) - 1.0) < 1e-9
    assert abs(w.quantile("ttft_s", 0.5) - 0.6) < 1e-9
    now[0] += 5.0                                    # everything ages out
    assert w.rate("arrivals") == 0.0 and w.quantile("ttft_s", 0.9) == 0.0
