"""tool_select: choosing and calling unseen tools in ReAct (report §3.4, Table 6; spec §6).

The suite is generated, deterministically, by `unseen_tool_suite` (code, not data): tools
invented for it (so no model has seen them), several offered per query in shuffled order.
Positive queries need exactly one of the offered tools, with known arguments; negative queries
(chit-chat, general knowledge, writing) need none. Queries are in English and Chinese (the
report's benchmark is Chinese). The prompt is the ReAct user turn (`react_query`) in ChatML;
generation stops at `Observation:` (one step: the action is judged, not executed).
    Tool Selection (Acc.)  % of positives whose last Action names the expected tool
    Tool Input (Rouge-L)   mean Rouge-L F1 (x100) of the Action Input against the expected
                           arguments (JSON), over the positives (0 without an Action Input)
    False Positive Error   % of negatives that produced an Action
Rouge-L here: LCS over tokens (each CJK character one token, otherwise runs of letters/digits,
lower-cased; punctuation dropped so JSON layout does not count), F1 = 2PR / (P + R) (Qwen's
evaluate_plugin.py tokenizes with jieba; ours needs no dictionary).
A sample's `correct`: positive, the right tool; negative, no action.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from qwen_jax.evals.model_api import chat_prompt
from qwen_jax.evals.tasks import Item, Task, Verdict, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS

_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u9fff\uf900-\ufaff]+")


# --- Rouge-L ---------------------------------------------------------------------------------
def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 in [0, 1] of `prediction` against `reference` (module docstring). Two empty
    texts agree (1.0); one empty text scores 0."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# --- the generated suite ---------------------------------------------------------------------
# (name, human name, description, [(param, JSON type, description, values)], en query, zh query)
# fmt: off
_CATALOG = [
    ("tidewatch_levels", "TideWatch", "Predicted tide heights for a coastal station on a date.",
     [("station", "string", "tide station name", ["Brest", "Kobe", "Halifax", "Cadiz"]),
      ("date", "string", "date, YYYY-MM-DD", ["2024-05-03", "2025-01-17", "2024-11-30"])],
     "How high will the tide be at {station} on {date}?", "{date}{station}的潮位有多高？"),
    ("pollencast_index", "PollenCast", "Today's pollen index of a city for one allergen.",
     [("city", "string", "city name", ["Vienna", "Osaka", "Denver", "Lyon"]),
      ("allergen", "string", "birch, grass or ragweed", ["birch", "grass", "ragweed"])],
     "Is the {allergen} pollen bad in {city} today?", "今天{city}的{allergen}花粉指数高吗？"),
    ("parcelpath_track", "ParcelPath", "Where a parcel is, from its tracking number.",
     [("tracking_number", "string", "the carrier's tracking number",
       ["PX4410293", "ZQ0092831", "LM7781002"])],
     "Where is my parcel {tracking_number} right now?", "帮我查一下快递{tracking_number}到哪了。"),
    ("pantrychef_recipes", "Pantry Chef", "Recipes that use an ingredient, within a time limit.",
     [("ingredient", "string", "main ingredient", ["lentils", "tofu", "eggplant", "salmon"]),
      ("max_minutes", "integer", "longest cooking time", [15, 30, 45])],
     "Find me a {ingredient} recipe that takes at most {max_minutes} minutes.",
     "找一个用{ingredient}做的菜谱，{max_minutes}分钟以内能做好。"),
    ("railplanner_trips", "RailPlanner", "Train connections between two stations.",
     [("origin", "string", "departure station", ["Zurich", "Milan", "Utrecht"]),
      ("destination", "string", "arrival station", ["Geneva", "Turin", "Ghent"])],
     "Which trains go from {origin} to {destination}?", "从{origin}到{destination}有哪些火车？"),
    ("fxrate_convert", "FXRate", "Convert an amount of money between two currencies.",
     [("amount", "number", "the amount", [120, 45.5, 3000]),
      ("from_currency", "string", "ISO code", ["EUR", "JPY", "CNY"]),
      ("to_currency", "string", "ISO code", ["USD", "GBP", "CHF"])],
     "How much is {amount} {from_currency} in {to_currency}?",
     "{amount}{from_currency}换成{to_currency}是多少？"),
    ("exoarchive_planet", "Exoplanet Archive", "Known properties of an exoplanet.",
     [("planet", "string", "planet designation", ["Kepler-22b", "TRAPPIST-1e", "HD 209458 b"])],
     "What is known about the exoplanet {planet}?", "系外行星{planet}有哪些已知参数？"),
    ("sunmeter_yield", "SunMeter", "Expected yearly output of a solar installation.",
     [("latitude", "number", "site latitude in degrees", [47.4, 35.7, 51.5]),
      ("panel_kw", "number", "installed peak power in kW", [4, 7.5, 10])],
     "How much energy would a {panel_kw} kW solar array at latitude {latitude} make per year?",
     "纬度{latitude}度、{panel_kw}千瓦的光伏系统一年能发多少电？"),
    ("rhymebox_find", "RhymeBox", "Words that rhyme with a given word.",
     [("word", "string", "the word to rhyme", ["orange", "silver", "window", "season"])],
     "Give me words that rhyme with '{word}'.", "有哪些英文单词和{word}押韵？"),
    ("museumguide_hours", "MuseumGuide", "Opening hours of a museum.",
     [("museum", "string", "museum name", ["Rijksmuseum", "Prado", "Palace Museum"])],
     "When is the {museum} open?", "{museum}几点开门？"),
    ("cycledock_bikes", "CycleDock", "Free bikes at a bike-share station.",
     [("station", "string", "station name", ["Central Square", "Harbour Gate", "Old Mill"])],
     "Are there bikes available at the {station} station?", "{station}站现在还有共享单车吗？"),
    ("skystatus_flight", "SkyStatus", "Live status of a flight.",
     [("flight_number", "string", "IATA flight number", ["LX318", "NH204", "KL1002"])],
     "Is flight {flight_number} on time?", "航班{flight_number}准点吗？"),
]
_NEGATIVE = [
    "Tell me a joke about cats.",
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Give me three synonyms for 'happy'.",
    "Explain what photosynthesis is in one sentence.",
    "你好，请介绍一下你自己。",
    "用一句话解释什么是万有引力。",
    "写一首关于月亮的短诗。",
    "三角形的内角和是多少度？",
    "推荐一个学习编程的好习惯。",
    "把“早上好”翻译成英文。",
]
# fmt: on


def _spec(entry):
    from qwen_jax.tools.spec import ToolSpec

    name, human, description, params, _, _ = entry
    properties = {p: {"type": t, "description": d} for p, t, d, _ in params}
    schema = {"type": "object", "properties": properties, "required": [p[0] for p in params]}
    return ToolSpec(name, description, schema, name_for_human=human)


def unseen_tool_suite(
    n_positive: int = 200, n_negative: int = 100, tools_per_query: int = 3, seed: int = 0
) -> list[dict]:
    """The suite: dicts {id, category ("positive"/"negative"), lang, query, tools (ToolSpec
    list, shuffled), gold (None, or {"name", "arguments"})}. Every third item is negative
    (while both remain), so any prefix samples both kinds. Same arguments, same suite."""
    if not 1 <= tools_per_query <= len(_CATALOG):
        raise ValueError(f"tools_per_query must be in [1, {len(_CATALOG)}]")
    rng = random.Random(seed)
    specs = [_spec(e) for e in _CATALOG]
    suite, pos, neg = [], 0, 0
    while pos < n_positive or neg < n_negative:
        negative = neg < n_negative and (pos >= n_positive or len(suite) % 3 == 2)
        lang = rng.choice(("en", "zh"))
        if negative:
            query = rng.choice(_NEGATIVE)
            lang = "zh" if re.search(r"[\u4e00-\u9fff]", query) else "en"
            tools, gold = rng.sample(specs, tools_per_query), None
            neg += 1
        else:
            k = rng.randrange(len(_CATALOG))
            name, _, _, params, en, zh = _CATALOG[k]
            args = {p: rng.choice(values) for p, _, _, values in params}
            query = (en if lang == "en" else zh).format(**args)
            others = rng.sample([s for i, s in enumerate(specs) if i != k], tools_per_query - 1)
            tools = [specs[k], *others]
            rng.shuffle(tools)
            gold = {"name": name, "arguments": args}
            pos += 1
        category = "negative" if negative else "positive"
        suite.append(
            {
                "id": f"{category}/{neg if negative else pos}",
                "category": category,
                "lang": lang,
                "query": query,
                "tools": tools,
                "gold": gold,
            }
        )
    return suite


# --- scoring ---------------------------------------------------------------------------------
def judge(output: str, gold: dict | None) -> dict:
    """{action, selected (right tool / no tool), rouge_l (positives), false_positive
    (negatives)} of one model output."""
    from qwen_jax.tools.react import parse_react

    step = parse_react(output)
    action = step.action.strip() if step.action is not None else None
    if gold is None:
        return {"action": action, "selected": action is None, "false_positive": action is not None}
    reference = json.dumps(gold["arguments"], ensure_ascii=False)
    score = rouge_l(step.action_input or "", reference) if action is not None else 0.0
    return {"action": action, "selected": action == gold["name"], "rouge_l": score}


def build(
    data_dir: Path,
    *,
    shots: int | None = None,
    chat: bool = False,
    n_positive: int = 200,
    n_negative: int = 100,
    tools_per_query: int = 3,
    seed: int = 0,
    max_new_tokens: int = 256,
) -> Task:
    """The suite needs no data directory (it is generated); `data_dir` is ignored."""
    from qwen_jax.tools.react import STOP_WORDS, react_query

    if shots not in (None, 0):
        raise ValueError(f"tool_select is 0-shot, got shots={shots}")
    items = []
    for s in unseen_tool_suite(n_positive, n_negative, tools_per_query, seed):
        prompt = chat_prompt(react_query(s["tools"], s["query"]))
        gold = json.dumps(s["gold"], ensure_ascii=False) if s["gold"] else ""
        items.append(Item(s["id"], s["category"], prompt, gold, {"lang": s["lang"]}))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        verdicts = []
        for item, out in zip(batch, outputs):
            j = judge(out, json.loads(item.gold) if item.gold else None)
            detail = f"rouge_l={j['rouge_l']:.4f}" if "rouge_l" in j else ""
            verdicts.append(Verdict(j["action"], j["selected"], "scored", detail))
        return verdicts

    return Task(
        task_name("tool_select", 0, True),
        "generate",
        items,
        score,
        max_new_tokens=max_new_tokens,
        stop=tuple(STOP_WORDS) + STOP_TOKENS,
        metric="right tool or none",
        report=report,
    )


def report(records: list[dict]) -> dict:
    """Table 6's three numbers from the sample records."""
    pos = [r for r in records if r["category"] == "positive"]
    neg = [r for r in records if r["category"] == "negative"]
    judged = [judge(r["output"], json.loads(r["gold"])) for r in pos]
    accuracy = 100.0 * sum(j["selected"] for j in judged) / len(pos) if pos else None
    rouge = 100.0 * sum(j["rouge_l"] for j in judged) / len(pos) if pos else None
    fp = 100.0 * sum(r["extracted"] is not None for r in neg) / len(neg) if neg else None

    def fmt(x):
        return "-" if x is None else f"{x:.1f}"

    table = "\n".join(
        [
            "Table 6: tool use on unseen tools (ReAct)",
            "",
            "| Model | Tool Selection (Acc.) | Tool Input (Rouge-L) | False Positive Error (%) |",
            "|---|---|---|---|",
            f"| this model | {fmt(accuracy)} | {fmt(rouge)} | {fmt(fp)} |",
            "",
            f"positives: {len(pos)}, negatives: {len(neg)}",
        ]
    )
    metrics = {"tool_selection": accuracy, "tool_input_rouge_l": rouge, "false_positive": fp}
    return {"metrics": metrics, "table": table}
