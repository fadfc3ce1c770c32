import subprocess
import sys


def _passes_in_a_fresh_interpreter(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_import_and_discovery_stay_light():
    code = (
        "import sys, meshplan, meshplan.plugins.manager\n"
        "assert 'pluggy' in sys.modules\n"
        "assert meshplan.plugins.manager._host is None, 'discovery must be lazy'\n"
        "names = [s['name'] for s in meshplan.list_strategies()]\n"
        "assert 'fsdp2' in names, names\n"
        "heavy = [m for m in ('transformers', 'megatron_fsdp', 'torch.distributed.tensor',\n"
        "                     'torch.distributed.fsdp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    _passes_in_a_fresh_interpreter(code)


def test_listing_presets_stays_light():
    """``meshplan presets`` reads only the preset files: not the dry run, the api or DTensor/FSDP."""
    code = (
        "import sys\n"
        "from meshplan.cli.main import main\n"
        "assert main(['presets']) == 0\n"
        "heavy = [m for m in ('meshplan.api', 'meshplan.dryrun.run', 'transformers', 'torch.distributed.tensor',\n"
        "                     'torch.distributed.fsdp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    _passes_in_a_fresh_interpreter(code)
