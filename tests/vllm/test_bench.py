"""``m2iv bench --engine vllm --smoke``: the harness runs every mode and writes its files."""
import json

from m2iv.cli import main


def test_vllm_bench_smoke(tmp_path):
    # --cpu-threads 0: leave vLLM's thread binding to the other engines of this session alone
    assert main(["bench", "--engine", "vllm", "--smoke", "--cpu-threads", "0", "--out",
                 str(tmp_path)]) == 0
    (js,) = tmp_path.glob("vllm-*.json")
    doc = json.loads(js.read_text())
    modes = [r["mode"] for r in doc["rows"]]
    assert modes == ["plain vLLM", "plain vLLM (control)", "m2iv unsteered", "K=1",
                     "K=4"]
    assert doc["rows"][0]["ratio_vs_plain"] == 1.0
    assert all(r["output_tok_s"] > 0 for r in doc["rows"])
    assert doc["machine"]["vllm_version"].startswith("0.32")
    assert list(tmp_path.glob("vllm-*.csv")) and list(tmp_path.glob("vllm-*.png"))
