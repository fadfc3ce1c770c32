"""Guarantees of meshplan's Hugging Face checkpoint functions that the load/round-trip matrix of
``test_hf_checkpoint`` does not show, on 2 or 4 gloo ranks: an interrupted save leaves the previous folder as it
was; rank 0 logs the progress of a load; a user's ``register_checkpoint_conversion_mapping`` renaming is used; the
folder's dtype is cast to the parameters' like transformers does; a missing key or a wrong shape is the same typed
error on every rank; every rank reads only its own shards' bytes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.state.hf_checks import _mesh, build_model, write_folders

pytestmark = pytest.mark.distributed

DP_TP = {"dp_shard": 2, "tp": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return write_folders(tmp_path_factory.mktemp("hf"), ["llama", "mixtral"])


def _rewritten(source: str, target: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> str:
    """A copy of the folder ``source`` whose tensors, file by file, went through ``edit(dict)`` (in place); the
    index, if any, follows the edited keys."""
    shutil.copytree(source, target)
    weight_map = {}
    for file in sorted(target.glob("*.safetensors")):
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    index = target / "model.safetensors.index.json"
    if index.is_file():
        content = json.loads(index.read_text())
        index.write_text(json.dumps({**content, "weight_map": weight_map}))
    return str(target)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _differing(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key for key in expected.keys() | loaded.keys()
                  if key not in loaded or key not in expected or loaded[key].dtype != expected[key].dtype
                  or not torch.equal(loaded[key], expected[key]))


# --- an interrupted save ---------------------------------------------------------------------------------
def _interrupted_save(folder: str, out: str) -> str:
    """Runs on every rank: save_pretrained to ``out`` whose writer fails (disk full) once it begins a second file;
    the error each rank gets."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    import meshplan.state.hf_save as hf_save

    model = meshplan.from_pretrained(folder, _mesh({"dp_shard": 2}), mp_policy=MixedPrecisionPolicy())
    original = hf_save._FolderWriter.write
    started: list[str] = []

    def failing_write(writer: Any, key: str, tensor: torch.Tensor) -> None:
        file = writer.split.tensor_to_filename[key]
        if file not in started:
            started.append(file)
        if len(started) > 1:  # a second file begins: the disk is full now
            raise OSError(28, "No space left on device")
        original(writer, key, tensor)

    hf_save._FolderWriter.write = failing_write
    try:
        meshplan.save_pretrained(model, out, max_shard_size="60KB")
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return _error(exc)
    finally:
        hf_save._FolderWriter.write = original
    return "saved"


def _contents(folder: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(folder.iterdir())}


def test_an_interrupted_save_leaves_the_previous_folder_unchanged(ranks2, folders, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(folders["llama"], out)  # the previous folder
    before = _contents(out)
    assert sum(name.endswith(".safetensors") for name in before) > 2  # several files: the failure is mid-save
    results = ranks2.run(_interrupted_save, folders["llama"], str(out))
    assert results[0].startswith("CheckpointError: save_pretrained to") and "No space left on device" in results[0]
    assert "previous folder there is unchanged" in results[0]
    assert results[1].startswith("CheckpointError: Another rank failed to save"), results[1]
    assert _contents(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary folder left


# --- rank 0's progress log -------------------------------------------------------------------------------
def _progress_records(folder: str) -> list[tuple[Any, ...]]:
    """Runs on every rank: the arguments of the progress lines a load logs on this rank (threshold lowered so
    that every parameter logs one), and this rank's shard bytes as the last item."""
    import logging

    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    import meshplan.state.hf_load as hf_load

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger(hf_load.__name__)
    level, threshold = logger.level, hf_load.PROGRESS_EVERY
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    hf_load.PROGRESS_EVERY = -1.0
    try:
        model = meshplan.from_pretrained(folder, _mesh({"dp_shard": 2}), mp_policy=MixedPrecisionPolicy())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        hf_load.PROGRESS_EVERY = threshold
    own = sum(tensor.to_local().nbytes for tensor in model.parameters())
    return [(record.getMessage(), *record.args) for record in records if "MiB read" in record.msg] + [own]


def test_rank0_logs_the_progress_of_a_load_with_bytes_and_rate(ranks2, folders):
    rank0, rank1 = ranks2.run(_progress_records, folders["mixtral"])
    assert rank1[:-1] == []  # only rank 0 speaks
    *lines, own = rank0
    assert len(lines) > 10  # one per tensor with the threshold lowered, then the final line
    message, prefix, done, total, rate, _ = lines[-1]
    assert prefix == "done, " and done == total == own / 2**20 and rate > 0
    assert message.startswith("load_pretrained: done, ") and "MiB/s" in message
    read = [line[2] for line in lines[:-1]]
    assert read == sorted(read) and read[-1] == total  # bytes grow to the total


# --- a user's conversion mapping -------------------------------------------------------------------------
def _load_with_user_renaming(folder: str, expected_file: str, registered_as: str) -> list[str] | str:
    """Runs on every rank: registers ``feed_forward -> mlp`` for ``registered_as`` (a model type or a class
    name), loads ``folder`` under dp_shard=2 x tp=2, and returns the tensors that differ from ``expected_file``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    import meshplan

    conversion_mapping.register_checkpoint_conversion_mapping(
        registered_as, [WeightRenaming(r"\.feed_forward\.", ".mlp.")])
    try:
        model = meshplan.from_pretrained(folder, _mesh(DP_TP), mp_policy=MixedPrecisionPolicy())
        return _differing(meshplan.gather_full_state_dict(model, rank0_only=False), torch.load(expected_file))
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return _error(exc)
    finally:  # the ranks live on for other tests: the registry as it was
        conversion_mapping._checkpoint_conversion_mapping_cache.pop(registered_as, None)
        conversion_mapping.USER_REGISTERED_MAPPINGS.discard(registered_as)


@pytest.mark.parametrize("registered_as", ["llama", "LlamaForCausalLM"])
def test_a_user_registered_renaming_is_used(ranks4, folders, tmp_path, registered_as):
    def rename(tensors):
        for key in [key for key in tensors if ".mlp." in key]:
            tensors[key.replace(".mlp.", ".feed_forward.")] = tensors.pop(key)

    renamed = _rewritten(folders["llama"], tmp_path / "renamed", rename)
    assert any(".feed_forward." in key for file in Path(renamed).glob("*.safetensors") for key in load_file(file))
    torch.save(build_model("llama").state_dict(), tmp_path / "expected.pt")
    results = ranks4.run(_load_with_user_renaming, renamed, str(tmp_path / "expected.pt"), registered_as)
    assert results == [[]] * 4, results[0]


def _load_error(folder: str) -> str:
    """Runs on every rank: the error ``from_pretrained`` of ``folder`` raises under dp_shard=2 x tp=2."""
    import meshplan

    try:
        meshplan.from_pretrained(folder, _mesh(DP_TP))
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return _error(exc)
    return "loaded"


def test_without_the_renaming_the_renamed_folder_is_refused(ranks4, folders, tmp_path):
    def rename(tensors):
        for key in [key for key in tensors if ".mlp." in key]:
            tensors[key.replace(".mlp.", ".feed_forward.")] = tensors.pop(key)

    results = ranks4.run(_load_error, _rewritten(folders["llama"], tmp_path / "renamed", rename))
    assert results[0].startswith("CheckpointKeyError:") and "feed_forward" in results[0]
    assert results == [results[0]] * 4


# --- the checkpoint's dtype cast to the parameters' -------------------------------------------------------
def _bf16_parity(folder: str) -> list[str]:
    """Runs on every rank: an fp32 folder loaded into a bf16 model under dp_shard=2 x tp=2 against transformers'
    own bf16 load; the tensors that differ (in value or dtype)."""
    from transformers import AutoModelForCausalLM

    import meshplan

    model = meshplan.from_pretrained(folder, _mesh(DP_TP), dtype=torch.bfloat16)
    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    return _differing(meshplan.gather_full_state_dict(model, rank0_only=False), expected)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_an_fp32_folder_loads_into_bf16_like_transformers(ranks4, folders, name):
    assert load_file(next(Path(folders[name]).glob("*.safetensors"))).popitem()[1].dtype == torch.float32
    assert ranks4.run(_bf16_parity, folders[name]) == [[]] * 4


# --- typed errors on every rank --------------------------------------------------------------------------
def _load_own_folder(folders: list[str]) -> str:
    """Runs on every rank: loads its own folder of ``folders`` (dp_shard=2); the error it raises."""
    import torch.distributed as dist

    import meshplan

    try:
        meshplan.from_pretrained(folders[dist.get_rank()], _mesh({"dp_shard": 2}))
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return _error(exc)
    return "loaded"


def _drop_norm(tensors: dict[str, torch.Tensor]) -> None:
    tensors.pop("model.layers.1.post_attention_layernorm.weight", None)


def _narrow_up_proj(tensors: dict[str, torch.Tensor]) -> None:
    key = "model.layers.0.mlp.up_proj.weight"
    if key in tensors:
        tensors[key] = tensors[key][:-32].clone()


DAMAGE = {
    "missing_key": (_drop_norm, "CheckpointKeyError:", "'model.layers.1.post_attention_layernorm.weight'"),
    "wrong_shape": (_narrow_up_proj, "CheckpointShapeError:", "model.layers.0.mlp.up_proj.weight: (96, 64)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_bad_folder_is_the_same_typed_error_on_every_rank(ranks2, folders, tmp_path, damage):
    edit, kind, detail = DAMAGE[damage]
    broken = _rewritten(folders["llama"], tmp_path / "broken", edit)
    results = ranks2.run(_load_own_folder, [broken, broken])
    assert results[0].startswith(kind) and detail in results[0], results[0]
    assert results[1] == results[0]
    # one rank's folder only: the other rank stops too, with a CheckpointError, and nobody hangs
    results = ranks2.run(_load_own_folder, [folders["llama"], broken])
    assert results[0].startswith("CheckpointError: Another rank could not load") and results[1].startswith(kind)


# --- every rank reads its own bytes ----------------------------------------------------------------------
def _bytes_read(folder: str) -> tuple[int, int]:
    """Runs on every rank: (bytes this rank read from ``folder`` under dp_shard=2 x tp=2, bytes of its local
    shards)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoConfig, AutoModelForCausalLM

    import meshplan

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model = meshplan.parallelize(model, _mesh(DP_TP), mp_policy=MixedPrecisionPolicy())
    report = meshplan.load_pretrained(model, folder)
    return report.bytes_read, sum(tensor.to_local().nbytes for tensor in model.parameters())


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_each_rank_reads_about_a_quarter_of_the_folder(ranks4, folders, name):
    stored = sum(tensor.nbytes for file in Path(folders[name]).glob("*.safetensors")
                 for tensor in load_file(file).values())
    results = ranks4.run(_bytes_read, folders[name])
    for read, own in results:
        assert read == own  # exactly its shards: no row outside them
        assert 0.2 * stored < read < 0.3 * stored  # a quarter, give or take the replicated norms


# --- the saved config names the model's own class, whatever wrapped it ---------------------------------------
def _save(folder: str, out: str, shape: dict[str, int], options: dict[str, Any]) -> None:
    """Runs on every rank: from_pretrained on a mesh of ``shape`` then save_pretrained to ``out``."""
    import meshplan

    meshplan.save_pretrained(meshplan.from_pretrained(folder, _mesh(shape), **options), out)


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_the_saved_config_names_the_models_own_class(ranks2, folders, tmp_path, strategy):
    shape = {"dp": 2} if strategy == "ddp" else {"dp_shard": 2}
    ranks2.run(_save, folders["llama"], str(tmp_path / "out"), shape, {"strategy": strategy})
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
