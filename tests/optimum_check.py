"""Check that an edgeprune ONNX export loads in optimum's ORTModelForCausalLM and generates the same greedy
tokens as edgeprune's own onnxruntime loop. Runs in a separate environment (optimum-onnx needs
transformers < 4.58, edgeprune uses 5.24): `make check-optimum`.

    python tests/optimum_check.py ARTIFACT_DIR
"""

import importlib.util
import sys
from pathlib import Path


def main(art: str) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ort_generate", root / "devices" / "ort_generate.py")
    ort_generate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ort_generate  # dataclasses look their module up while the class is built
    spec.loader.exec_module(ort_generate)

    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(art)
    model = ORTModelForCausalLM.from_pretrained(art)
    enc = tok(prompt, return_tensors="pt", return_token_type_ids=False, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    theirs = out[0, enc["input_ids"].shape[1]:].tolist()
    ours = list(ort_generate.OrtGenerator(art).generate(enc["input_ids"][0].tolist(), max_new_tokens=8))
    print("optimum :", theirs)
    print("edgeprune:", ours)
    if theirs != ours:
        sys.exit("error: optimum's greedy tokens differ from edgeprune's onnxruntime loop")
    print("optimum.onnxruntime.ORTModelForCausalLM loads the export and agrees")


if __name__ == "__main__":
    main(sys.argv[1])
