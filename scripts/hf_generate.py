"""Loads an exported Hugging Face folder with transformers and answers a prompt greedily.

    python scripts/hf_generate.py runs/demo/hf "What is 12 plus 30? Reply with the number."

Proof that an im_jax export is an ordinary HF model: nothing from im_jax is imported.
"""

import sys

import transformers


def main(hf_dir: str, prompt: str, max_new_tokens: int = 24) -> str:
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
  out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
  return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  answer = main(sys.argv[1], sys.argv[2])
  print(f"prompt: {sys.argv[2]}\nanswer: {answer}")
