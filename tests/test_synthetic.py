"""The synthetic demo data: deterministic, well-formed and answerable from the prompt."""

import json
import re

from im_jax.data import synthetic


def test_deterministic_and_well_formed(tmp_path):
  a = synthetic.make_conversations(200, seed=1)
  assert a == synthetic.make_conversations(200, seed=1)
  assert a != synthetic.make_conversations(200, seed=2)
  path = synthetic.write_jsonl(tmp_path / "d.jsonl", a)
  lines = path.read_text().splitlines()
  assert len(lines) == 200
  for line, conv in zip(lines, a):
    rec = json.loads(line)
    roles = [m["role"] for m in rec["messages"]]
    assert roles[-1] == "assistant" and roles[-2] == "user"
    assert [m.role for m in conv.messages] == roles


def test_answers_follow_from_prompts():
  for conv in synthetic.make_conversations(300, seed=0):
    msgs = [m for m in conv.messages if m.role != "system"]
    for user, answer in zip(msgs[::2], msgs[1::2]):
      q, a = user.content, answer.content
      if q.startswith("What is"):
        x, y = map(int, re.findall(r"\d+", q))
        assert int(a) == x + y
      elif q.startswith("Sort"):
        nums = list(map(int, re.findall(r"\d+", q)))
        assert a == " ".join(map(str, sorted(nums)))
      elif q.startswith("Here is a list"):
        assert int(a) == len(q.split(": ")[1].split(". ")[0].split(", "))
      elif q.startswith("Reverse"):
        assert a.split() == q.split(": ")[1].rstrip(".").split()[::-1]
