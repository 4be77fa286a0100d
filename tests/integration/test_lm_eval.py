"""EleutherAI's lm-evaluation-harness against `tailor serve` on the default model: a loglikelihood task through its
`local-completions` model (token-id prompts, echo, logprobs) and a generation task through `local-chat-completions`,
from local task files (its datasets cannot be downloaded here), checked against tailor's own evaluation code
(`evaluate.sources.LocalModel`) on the same questions."""

import json
import threading
import time

import pytest
import torch
import uvicorn

from tailor.evaluate.metrics import token_f1
from tailor.evaluate.sources import LocalModel
from tailor.models.base import load_model, load_tokenizer
from tailor.serve.app import bind_socket, create_app
from tailor.serve.engine import Engine
from tests.conftest import EXAMPLE

pytestmark = pytest.mark.integration
QUESTIONS = 6
MAX_TOKENS = 24


def write_task(folder, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {data}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def server(default_model_dir):
    engine = Engine(default_model_dir, dtype=torch.float32, max_new_tokens=MAX_TOKENS)  # fp32: equal numerics
    sock = bind_socket("127.0.0.1", 0)
    served = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    threading.Thread(target=served.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not served.started:
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    served.should_exit = True
    engine.shutdown()


def test_lm_eval_scores_agree_with_tailors_own_evaluation(server, default_model_dir, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    engine, url = server
    tokenizer = engine.tokenizer
    pairs = [json.loads(line) for line in (EXAMPLE / "qa" / "eval.jsonl").read_text().splitlines()[:QUESTIONS]]
    conversations = [[{"role": "user", "content": pair["question"]}] for pair in pairs]
    # multiple choice: each question's own answer against two others; the choice ends the assistant turn, as
    # tailor's option scoring does (a label cannot win by being a prefix of a longer answer)
    options = [[pairs[i]["answer"], pairs[(i + 1) % QUESTIONS]["answer"], pairs[(i + 2) % QUESTIONS]["answer"]]
               for i in range(QUESTIONS)]
    write_task(tmp_path, "tailor_choice", [
        {"context": tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
         "choices": [option + "<|im_end|>" for option in choices], "label": 0}
        for conversation, choices in zip(conversations, options, strict=True)],
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    write_task(tmp_path, "tailor_answers", [{"question": p["question"], "answer": p["answer"]} for p in pairs],
               'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
               f'generation_kwargs:\n  until: []\n  max_gen_toks: {MAX_TOKENS}\n  do_sample: false\n'
               '  temperature: 0\nmetric_list:\n  - metric: exact_match\n')
    tasks = TaskManager(include_path=str(tmp_path))
    choice = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tailor_choice"], task_manager=tasks, log_samples=True,
        model_args={"base_url": f"{url}/completions", "model": "base", "tokenizer": default_model_dir,
                    "tokenizer_backend": "huggingface", "batch_size": 4, "max_retries": 1})
    answers = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["tailor_answers"], task_manager=tasks, log_samples=True,
        apply_chat_template=True, model_args={"base_url": f"{url}/chat/completions", "model": "base",
                                              "num_concurrent": 4, "max_retries": 1, "tokenized_requests": False})

    local = LocalModel("base", load_model(default_model_dir, dtype=torch.float32).eval(),
                       load_tokenizer(default_model_dir), torch.float32)
    ours = local.option_logprobs(conversations, options, batch_size=6)
    theirs = [[float(response[0][0]) for response in sample["resps"]]
              for sample in sorted(choice["samples"]["tailor_choice"], key=lambda s: s["doc_id"])]
    assert torch.allclose(torch.tensor(theirs), torch.tensor(ours), atol=0.01), (theirs, ours)
    our_accuracy = sum(row.index(max(row)) == 0 for row in ours) / QUESTIONS
    assert choice["results"]["tailor_choice"]["acc,none"] == pytest.approx(our_accuracy)

    our_answers = local.answers(conversations, max_new_tokens=MAX_TOKENS, batch_size=6)
    their_answers = [sample["resps"][0][0] for sample in
                     sorted(answers["samples"]["tailor_answers"], key=lambda s: s["doc_id"])]
    same = sum(a.strip() == b.strip() for a, b in zip(our_answers, their_answers, strict=True))
    # greedy both; a near-tie may flip one
    assert same >= QUESTIONS - 1, list(zip(our_answers, their_answers, strict=True))
    f1 = [sum(token_f1(a, p["answer"]) for a, p in zip(side, pairs, strict=True)) / QUESTIONS
          for side in (our_answers, their_answers)]
    assert abs(f1[0] - f1[1]) <= 0.05
    print(f"lm-eval acc {choice['results']['tailor_choice']['acc,none']:.3f} = tailor {our_accuracy:.3f}; "
          f"{same}/{QUESTIONS} identical answers; token F1 tailor {f1[0]:.3f}, lm-eval {f1[1]:.3f}")
