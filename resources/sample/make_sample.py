"""Write the small Traditional Chinese sample (train.xlsx, test.xlsx) in the real files' layout.

The stories are generated from templates by this project, not taken from any
data set. The training file carries the quirks seen in real users' files
(labels written as '選項2', ' 3', '４', '4.0'; numeric options; one missing
option) so the default workflow exercises every normalisation.

    python resources/sample/make_sample.py --out-dir resources/sample --cue   # the bundled sample
    python resources/sample/make_sample.py --out-dir DIR                     # no cue: only reading helps

With --cue the correct option starts with ★, a signal a tiny model can learn
in a minute on a CPU: the demo then shows that labels flow from xlsx to CSV
and that training learns, not that it reads. The mark travels with its
option, so reordering the options (rotation scoring) keeps it meaningful.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pandas as pd

NAMES = ["小明", "小華", "美玲", "志強", "怡君", "家豪", "淑芬", "建宏", "雅婷", "俊傑", "佩珊", "冠宇"]
CITIES = ["臺北", "臺中", "高雄", "臺南", "新竹", "花蓮", "嘉義", "基隆", "宜蘭", "屏東"]
FOODS = ["牛肉麵", "滷肉飯", "珍珠奶茶", "蚵仔煎", "小籠包", "鳳梨酥", "臭豆腐", "刈包", "肉圓", "豆花"]
HOBBIES = ["打籃球", "彈鋼琴", "畫畫", "游泳", "爬山", "看書", "騎腳踏車", "下圍棋", "拍照", "寫日記"]
CUE = "★"


def choices(rng: random.Random, correct, pool) -> tuple[list, int]:
    wrong = rng.sample([p for p in pool if p != correct], 3)
    answer = rng.randrange(4)
    return wrong[:answer] + [correct] + wrong[answer:], answer + 1


def story(rng: random.Random) -> tuple[str, list[tuple[str, list, int]]]:
    name, city, trip = rng.choice(NAMES), *rng.sample(CITIES, 2)
    food, hobby = rng.choice(FOODS), rng.choice(HOBBIES)
    year, days, age = rng.randrange(2005, 2024), rng.randrange(2, 9), rng.randrange(9, 60)
    article = (
        f"{name}住在{city}，今年{age}歲。{name}最喜歡吃{food}，每個週末都會去{hobby}。"
        f"{year}年夏天，{name}和家人一起去{trip}旅行，在那裡住了{days}天，"
        f"回家以後還常常和朋友分享旅途中的趣事。"
    )
    questions = [
        (f"{name}住在哪裡？", *choices(rng, city, CITIES)),
        (f"{name}最喜歡吃什麼？", *choices(rng, food, FOODS)),
        (f"{name}哪一年去{trip}旅行？", *choices(rng, year, list(range(2005, 2024)))),
        (f"{name}在{trip}住了幾天？", *choices(rng, days, list(range(2, 9)))),
        (f"{name}週末常做什麼？", *choices(rng, hobby, HOBBIES)),
    ]
    return article, rng.sample(questions, 3)


def make_rows(articles: int, seed: int, cue: bool) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(articles):
        article, questions = story(rng)
        for question, options, answer in questions:
            if cue:
                options[answer - 1] = f"{CUE}{options[answer - 1]}"
            numbered = {f"選項{i + 1}": option for i, option in enumerate(options)}
            rows.append({"文章": article, "問題": question, **numbered, "正確答案": answer})
    return rows


def add_quirks(train: pd.DataFrame, test: pd.DataFrame) -> None:
    """Write some cells the way real users' files do."""
    label = train.columns.get_loc("正確答案")
    for row, form in zip(range(1, 26, 5), ["選項{}", " {}", "{}", "{}.0", "選項{}"]):
        value = train.iat[row, label]
        train.iat[row, label] = form.format(value) if form != "{}" else "０１２３４"[value]
    fractional = next(i for i in range(2, len(train)) if train.at[i, "正確答案"] != 1)
    train.at[fractional, "選項1"] = 0.25
    missing_train = next(i for i in range(2, len(train)) if train.at[i, "正確答案"] != 2)
    train.at[missing_train, "選項2"] = None
    missing_test = next(i for i in range(len(test)) if test.at[i, "正確答案"] != 4)
    test.at[missing_test, "選項4"] = None


def write_sample(out_dir: Path, train_articles: int, test_articles: int, seed: int, cue: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    train = pd.DataFrame(make_rows(train_articles, seed, cue)).astype(object)
    test = pd.DataFrame(make_rows(test_articles, seed + 1, cue)).astype(object)
    add_quirks(train, test)
    train.insert(0, "ID", [i // 3 + 1 for i in range(len(train))])
    test.insert(0, "題號", [10000001 + 7 * i for i in range(len(test))])
    train.to_excel(out_dir / "train.xlsx", index=False)
    test.drop(columns=["正確答案"]).to_excel(out_dir / "test.xlsx", index=False)
    # The test answers, for tests and for users who want to check a run by hand.
    test[["題號", "正確答案"]].rename(columns={"題號": "ID", "正確答案": "Answer"}).to_csv(
        out_dir / "test_answers.csv", index=False
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--train-articles", type=int, default=60)
    parser.add_argument("--test-articles", type=int, default=15)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cue", action="store_true", help="make the answer learnable from a cue in the question")
    args = parser.parse_args()
    write_sample(args.out_dir, args.train_articles, args.test_articles, args.seed, args.cue)


if __name__ == "__main__":
    main()
