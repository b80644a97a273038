"""Does the image's answer reach the position where the model answers, and does the model use it?

For each question named, on training rows (so that what is measured is reading, not
generalisation): the tuned model's first answer token against the reference, and a logistic
probe fitted on the hidden state at the answering position after each layer (the embeddings,
then each decoder layer), scored on held-out rows of the same question. A probe well above the
majority share at a layer whose model output stays at the majority answer means the picture's
answer has reached the answering position and the model has not learnt to turn it into words:
the limit is in the language model's training, not in the vision tower.

CPU, about a minute on the embedded run::

    python benchmarks/answer_probe.py --model models/merged --data data/processed --out results/
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

QUESTIONS = ("Is there text?", "Is there a green/black box artefact?", "How many polyps are in the image?",
             "How many instrumnets are in the image?", "What is the size of the polyp?")


def main(argv=None):
    from sklearn.linear_model import LogisticRegression

    from vqatune.config import load_params, section
    from vqatune.data.processed import load_prepared
    from vqatune.generation.generate import prompt_texts
    from vqatune.models.loading import load_base_model, load_processor
    from vqatune.prompts import PromptsConfig, build_messages

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/merged", help="a merged model folder")
    ap.add_argument("--data", default="data/processed")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rows", type=int, default=200, help="training rows per question (70%% fit the probe)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    train = load_prepared(args.data)["train"]
    prompts = section(load_params(args.params), "prompts", PromptsConfig)
    model, processor = load_base_model(args.model, device="cpu").eval(), load_processor(args.model)
    processor.tokenizer.padding_side = "left"  # the answering position is the last one in every row
    results = {"model": args.model, "questions": {}}
    for question in QUESTIONS:
        rows = [r for r in train.filter(lambda q: q == question, input_columns="question")][:args.rows]
        if len(rows) < 10:
            continue
        states, first = collections.defaultdict(list), []
        for i in range(0, len(rows), 25):
            batch = rows[i:i + 25]
            texts = prompt_texts(processor, [build_messages(r["question"], "none", prompts) for r in batch])
            inputs = processor(text=texts, images=[[r["image"].convert("RGB")] for r in batch],
                               return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model(**inputs, output_hidden_states=True)
            for layer, h in enumerate(out.hidden_states):
                states[layer].append(h[:, -1].float())
            first.extend(processor.tokenizer.decode([int(t)]) for t in out.logits[:, -1].argmax(-1))
        answers = np.array([r["answer"] for r in rows])
        fit = int(len(rows) * 0.7)
        held = answers[fit:]
        row = {"rows": len(rows), "majority": collections.Counter(held).most_common(1)[0][1] / len(held),
               "model_first_token_right": float(np.mean([a.startswith(f) and f != "" for a, f in zip(answers, first)])),
               "model_first_tokens": dict(collections.Counter(first).most_common(5)), "probe": {}}
        for layer, chunks in states.items():
            name = f"after layer {layer}" if layer else "embeddings"
            if len(set(answers[:fit])) < 2:  # one answer only: nothing to fit
                row["probe"][name] = None
                continue
            x = torch.cat(chunks).numpy()
            clf = LogisticRegression(max_iter=2000).fit(x[:fit], answers[:fit])
            row["probe"][name] = round(float((clf.predict(x[fit:]) == held).mean()), 3)
        results["questions"][question] = row
        print(question, json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    layers = list(next(iter(results["questions"].values()))["probe"])
    lines = ["| question | majority | model's first token right | " + " | ".join(f"probe {k}" for k in layers) + " |",
             "|---|---|---|" + "---|" * len(layers)]
    for q, row in results["questions"].items():
        lines.append(f"| {q} | {row['majority']:.2f} | {row['model_first_token_right']:.2f} | "
                     + " | ".join("-" if row["probe"][k] is None else f"{row['probe'][k]:.2f}" for k in layers) + " |")
    (out / "answer_probe.md").write_text(
        f"# Answer-position probes: `{args.model}`, training rows\n\n`python benchmarks/answer_probe.py "
        f"--model {args.model} --data {args.data} --out ...`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
