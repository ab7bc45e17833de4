"""Bring your own Hugging Face folder, end to end: a Llama folder (weights + a byte-level BPE tokenizer with a chat
template) is trained by scripts/train.py on tiny Shakespeare tokenized with its own tokenizer, exported, and
loaded back by transformers with the same logits and the same tokenizer behaviour."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from nanolab.chat import apply_chat_template  # noqa: E402
from nanolab.checkpoint import load_model_for_inference  # noqa: E402
from nanolab.hf import export_hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def hf_llama_folder(folder: Path, text: str) -> Path:
    """A tiny random LlamaForCausalLM saved by transformers, with a BPE tokenizer trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text.splitlines(True)[:4000], trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))])
    folder.mkdir(parents=True)
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE}))
    cfg = transformers.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
                                   bos_token_id=bpe.token_to_id("<|begin_of_text|>"),
                                   eos_token_id=bpe.token_to_id("<|eot_id|>"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"nanolab_{name}_roundtrip", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def text(data_dir) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def src(text, tmp_path_factory) -> Path:
    return hf_llama_folder(tmp_path_factory.mktemp("hf") / "src", text)


def test_import_train_export_roundtrip(data_dir, text, src, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    train = script("train")
    out = tmp_path / "run"
    assert train.main(["--init_from", str(src), "--dataset", "model", "--max_iters", "20", "--batch_size", "4",
                       "--block_size", "32", "--eval_interval", "10", "--eval_iters", "1", "--sample_len", "8",
                       "--learning_rate", "3e-3", "--warmup_iters", "0", "--out_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3  # it trained on text tokenized by the folder's BPE

    model, tok, _ = load_model_for_inference(out)  # the tokenizer came back from the checkpoint's own files
    assert type(tok).__name__ == "HFTokenizer" and tok.eos_token == "<|eot_id|>"
    export_hf(model, str(tmp_path / "hf"), tokenizer=tok)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    strings = ["ROMEO: speak", "", "héllo wörld — ünïcode", "<|eot_id|> in text", text[1000:1300]]
    for s in strings:
        assert tok.encode(s) == their_tok.encode(s), s
    idx = torch.tensor([tok.encode(text[5000:5030])])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], theirs(idx).logits, atol=1e-4, rtol=1e-4)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
    assert apply_chat_template(tok, chat, add_generation_prompt=True) == their_tok.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)


def test_grpo_on_a_folder_uses_its_tokenizer(data_dir, src, tmp_path, monkeypatch, one_thread):
    """grpo.py --init_from a Llama folder: prompts and targets are tokenized with the folder's BPE (its vocabulary
    of ~300 ids; GPT-2's would not fit the model), and the run writes its metrics."""
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    grpo = script("grpo")
    out = tmp_path / "grpo"
    assert grpo.main(["--init_from", str(src), "--task", "continuation", "--prompt_len", "8", "--max_new_tokens", "4",
                      "--batch_size", "2", "--group_size", "2", "--val_windows", "2", "--iters", "2",
                      "--log_interval", "1", "--out_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    ce = [r["val_ce"] for r in rows if "val_ce" in r]
    assert len(ce) == 2 and all(4.0 < c < 7.0 for c in ce)  # ~ln(300) for a random model over the folder's BPE


def test_hf_config_reads_config_json_alone(src, tmp_path):
    """hf_config gives the config import_hf builds, from config.json alone (the dry-run planner uses it)."""
    import shutil

    from nanolab.hf import hf_config, import_hf

    assert hf_config(src, dropout=0.1) == import_hf(src, dropout=0.1).config
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    shutil.copy(src / "config.json", only_config / "config.json")
    assert hf_config(only_config) == hf_config(src)  # no weights needed
    with pytest.raises(ValueError, match="config.json|safetensors|weights"):
        import_hf(only_config)
