"""The striping benchmark's own figures (bench/streams.py), on made-up runs: medians per
image, number of streams and compression, the ratio to one stream, and its table. No
timing here."""

from __future__ import annotations

import pytest

from bench import streams


def run(image: str, n: int, mode: str, mb_s: float, share: float = 1 / 3) -> dict[str, object]:
    return {
        "image": image,
        "streams": n,
        "compress": mode,
        "agreed_streams": n,
        "mb_s": mb_s,
        "cpu_s_per_gib_sender": 1.0 * n,
        "cpu_s_per_gib_receiver": 0.8,
        "cpu_s_per_gib_servers": 1.5,
        "busiest_server_share": share if n > 1 else 1.0,
        "digest": f"blk64k-xxh3-128:{image}",
    }


def test_each_combination_is_the_median_of_its_rounds_and_compared_with_one_stream() -> None:
    runs = [
        *(run("random", 1, "off", mb) for mb in (400.0, 420.0, 380.0)),
        *(run("random", 2, "off", mb) for mb in (500.0, 600.0, 550.0)),
        *(run("random", 2, "auto", mb) for mb in (300.0, 310.0, 290.0)),
    ]
    table = streams.summarise(runs, [1, 2, 4], ["off", "auto"])
    rows = table["random"]
    assert list(rows) == ["1/off", "2/off", "2/auto"]  # 4 streams and 1/auto never ran
    assert rows["2/off"]["mb_s"] == 550.0
    assert rows["2/off"]["vs_one_stream"] == pytest.approx(550 / 400)
    assert rows["2/auto"]["vs_one_stream"] is None  # no one-stream run with auto
    assert rows["2/off"]["digests"] == ["blk64k-xxh3-128:random"]
    assert rows["2/off"]["busiest_server_share"] == pytest.approx(1 / 3)
    text = streams.markdown(table, cores=2)
    assert text.startswith("2 cores, 3 nats-servers")
    assert "| random | 2 | off | 550 | 1.38 | 2.00 | 0.80 | 1.50 | 33% |" in text
    assert "| random | 2 | auto | 300 | n/a |" in text


@pytest.mark.parametrize(
    "args", [["--streams", "0"], ["--streams", "9"], ["--compress", "gzip"], ["--rounds", "0"]]
)
def test_a_bad_option_is_a_usage_error_not_a_traceback(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        streams.main(args)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
