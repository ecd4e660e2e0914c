"""``fascore run`` / ``python -m fascore.compat`` (fascore.compat.runner): scripts, ``-m`` modules,
torchrun-style launches, ``--capture``, and clean reports of the program's own exceptions."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest

from fascore import compat
from fascore.compat import runner

BAD_VALUE = '''
import torch
import torch_npu


def inner(x):
    raise ValueError(f"bad value {x}")


def outer():
    inner(torch.ones(1, device="npu").item())


outer()
'''
BAD_LAYOUT = '''
import torch
import torch_npu

q = torch.randn(1, 4, 2, 8).npu()
out = torch_npu.npu_fusion_attention(q, q, q, 2, "BSDN")
'''


def _run(tmp_path, text, *args, name="prog.py"):
    script = tmp_path / name
    script.write_text(textwrap.dedent(text))
    err = io.StringIO()
    code = runner.run(runner.parse_args(["--device", "cpu", str(script), *args]), stderr=err)
    return code, err.getvalue(), script


def test_the_programs_exception_is_reported_at_its_frame(clean, tmp_path):
    code, err, script = _run(tmp_path, BAD_VALUE)
    assert code == 1
    last = err.strip().splitlines()
    assert f"fascore run: {script} raised ValueError at {script}:7 in inner" in err, err
    assert last[-1].strip() == "ValueError: bad value 1.0"
    assert "Traceback" in err and "in outer" in err
    assert "fascore/compat" not in err and "runpy" not in err


def test_a_flash_attention_error_names_the_call_in_the_program(clean, tmp_path):
    code, err, script = _run(tmp_path, BAD_LAYOUT)
    assert code == 1
    assert f"raised FlashAttentionError at {script}:6 in <module>: out = torch_npu.npu_fusion_attention" in err, err
    assert "input_layout" in err and "fascore/compat" not in err and "<fascore" not in err


def test_exit_codes_and_argv(clean, tmp_path):
    code, err, _ = _run(tmp_path, "import sys\nassert sys.argv[1:] == ['--device', 'npu', '-v']\nsys.exit(3)\n",
                        "--device", "npu", "-v")
    assert code == 3, err
    code, _, _ = _run(tmp_path, "import sys\nsys.exit('stopped')\n")
    assert code == 1


def test_parse_args():
    cfg = runner.parse_args(["--device", "cpu", "--capture", "b", "--capture-sample", "0.25", "-m", "pkg.mod",
                             "--capture", "x"])
    assert (cfg.module, cfg.target, cfg.args, cfg.capture, cfg.capture_sample) == \
        (True, "pkg.mod", ["--capture", "x"], "b", 0.25)
    assert runner.parse_args(["--capture-sample", "4", "-m", "m"]).capture_sample == 4
    for bad in (["--device", "npu", "-m", "m"], ["--bogus", "-m", "m"], ["--capture-sample", "x", "-m", "m"], [],
                ["no_such_script.py"], ["--nproc-per-node", "0", "-m", "m"]):
        with pytest.raises(ValueError):
            runner.parse_args(bad)


MODULE = '''
import sys
import torch
import torch_npu

q = torch.randn(1, 16, 2, 8, device="npu:0")
for _ in range(3):
    out = torch_npu.npu_fusion_attention(q, q, q, 2, "BSND", scale=0.3)[0]
print("argv", sys.argv[1:], out.device, torch_npu.__name__)
'''


def test_module_with_capture_via_the_command_line(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(textwrap.dedent(MODULE))
    r = subprocess.run([sys.executable, "-m", "fascore.tools.cli", "run", "--device", "cpu", "--capture", "bundle",
                        "--capture-sample", "2", "-m", "mypkg.train", "--lr", "1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "argv ['--lr', '1'] cpu torch_npu" in r.stdout
    index = json.loads((tmp_path / "bundle" / "fascore_bundle.json").read_text())
    assert index["sample"] == 2 and index["calls_seen"] == 3 and len(index["calls"]) == 2
    assert {c["api"] for c in index["calls"]} == {"npu_fusion_attention"}


DIST = '''
import os
import sys
import torch
import torch.distributed as dist
import torch_npu

local_rank = int(os.environ["LOCAL_RANK"])
torch.npu.set_device(local_rank)
dist.init_process_group(backend="hccl")
torch.manual_seed(0)
q = torch.randn(1, 32, 2, 8).npu()
shard = q[:, 16 * local_rank:16 * (local_rank + 1)]
out = torch_npu.npu_fusion_attention(shard, q, q, 2, "BSND", scale=0.3)[0]
parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
dist.all_gather(parts, out)
if dist.get_rank() == 0:
    full = torch_npu.npu_fusion_attention(q, q, q, 2, "BSND", scale=0.3)[0]
    ok = torch.allclose(torch.cat(parts, 1), full, atol=1e-6)
    with open(sys.argv[1], "w") as f:
        f.write(f"{dist.get_backend()} {dist.get_world_size()} {torch.npu.current_device()} {ok}")
dist.destroy_process_group()
'''


def test_torchrun_style_launch(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(DIST))
    out = tmp_path / "out.txt"
    r = subprocess.run([sys.executable, "-m", "fascore.compat", "--device", "cpu", "--nproc-per-node", "2", str(script),
                        str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_text() == "gloo 2 0 True"
