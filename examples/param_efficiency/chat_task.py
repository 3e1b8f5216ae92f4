"""The real-model experiment's task: two natural-language formatting skills in chat form.

- a date in words to ISO 8601 ("Write the 5th of March, 2021 as an ISO date." -> "2021-03-05"),
  asked in three date styles and three phrasings;
- a number to English words ("Spell out 347 in words." -> "three hundred forty-seven").

SmolLM2-135M-Instruct knows both skills loosely but not in this exact output format (it adds
sentences, capitals, "and"), so greedy exact match starts near 0. Validation and test use
dates and numbers that no training record has, so the adapters must learn the rules, not the
answers. Records are {"messages"}: the trainer renders them with the model's own chat template
and takes the loss on the assistant turn.
"""

import json
import os
import random

SYSTEM = "Answer in one line."  # short: the template's default system prompt is 20 tokens
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DATE_STYLES = ("{month} {day}, {year}", "{day} {month} {year}", "the {nth} of {month}, {year}")
DATE_QUESTIONS = ("Write {} as an ISO date.", "What is {} in YYYY-MM-DD form?",
                  "Convert {} to ISO 8601.")
NUMBER_QUESTIONS = ("Spell out {} in words.", "Write the number {} in words.",
                    "How is {} written in English words?")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0..999 in American English words, no "and": 347 -> "three hundred forty-seven"."""
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = ONES[rest]
    else:
        tail = TENS[rest // 10] + ("" if rest % 10 == 0 else "-" + ONES[rest % 10])
    if not hundreds:
        return tail
    return f"{ONES[hundreds]} hundred" + ("" if rest == 0 else " " + tail)


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date(rng: random.Random, day_of_year: int, year: int) -> tuple[str, str]:
    month, day = divmod(day_of_year, 28)  # 28 days a month: every date exists
    style = rng.choice(DATE_STYLES).format(month=MONTHS[month], day=day + 1, nth=ordinal(day + 1),
                                           year=year)
    return rng.choice(DATE_QUESTIONS).format(style), f"{year}-{month + 1:02d}-{day + 1:02d}"


def _number(rng: random.Random, n: int) -> tuple[str, str]:
    return rng.choice(NUMBER_QUESTIONS).format(n), number_words(n)


def _conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def write_chat_task(out: str, num_train: int, num_eval: int, seed: int = 0) -> dict:
    """train/val/test .jsonl under out (num_eval records each for val and test), half dates,
    half numbers. The dates (day, year) and the numbers of validation and test are drawn from
    pools that training never uses."""
    rng = random.Random(seed)
    dates = [(d, y) for d in range(12 * 28) for y in range(1950, 2031)]
    numbers = list(range(21, 1000))
    rng.shuffle(dates)
    rng.shuffle(numbers)
    held_dates, held_numbers = dates[:num_eval], numbers[:num_eval]  # val and test: half each
    pools = {"train": (dates[num_eval:], numbers[num_eval:]),
             "val": (held_dates[::2], held_numbers[::2]),
             "test": (held_dates[1::2], held_numbers[1::2])}
    sizes = {"train": num_train, "val": num_eval, "test": num_eval}
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, (date_pool, number_pool) in pools.items():
        records = []
        for i in range(sizes[split]):  # alternating skills, then shuffled
            if i % 2 == 0:
                records.append(_date(rng, *date_pool[(i // 2) % len(date_pool)]))
            else:
                records.append(_number(rng, number_pool[(i // 2) % len(number_pool)]))
        rng.shuffle(records)
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(_conversation(q, a)) + "\n" for q, a in records)
    return paths
