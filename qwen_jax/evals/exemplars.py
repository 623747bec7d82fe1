"""Fixed prompt material of the report's protocols: few-shot exemplars and subject tables.

Everything here is data, reproduced verbatim because the scores depend on it byte for byte:
- GSM8K_SHOTS: the 8 chain-of-thought exemplars of Qwen's `eval/gsm8k_prompt.txt` (base, 8-shot)
  as (question, reasoning lines, answer).
- GSM8K_CHAT_SHOTS: the 4 exemplars of Qwen's `evaluate_chat_gsm8k.py --use-fewshot`.
- MATH_SHOTS: the 4 Minerva-style (problem turn, solution turn) pairs of OpenCompass
  `math_gen_265cce` (the spec's assumed 4-shot MATH protocol), braces already unescaped; the
  stray "}" after the first problem is in the original and kept.
- MBPP_SHOTS: the 3 (task turn, answer turn) pairs of OpenCompass `mbpp_gen_1e1056` (MBPP task
  ids 2, 3, 4), including their irregular spaces and "\\r\\n" line ends.
- MMLU_CATEGORIES / CEVAL_SUBJECTS / CEVAL_HARD: the subject groupings of Qwen's
  `evaluate_mmlu.py` and `evaluate_ceval.py`.
"""

# Verbatim prompt data: long strings stay whole so they can be diffed against the sources.
# ruff: noqa: E501

# MMLU subject -> category, as Qwen's evaluate_mmlu.py groups them (57 subjects).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "Humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "Other": (
        "business_ethics",
        "college_medicine",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
        "global_facts",
        "clinical_knowledge",
    ),
    "Social Sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
}

# C-Eval subject -> (English name, Chinese name, category) for the 52 subjects.
CEVAL_SUBJECTS: dict[str, tuple[str, str, str]] = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": (
        "Mao Zedong Thought",
        "毛泽东思想和中国特色社会主义理论体系概论",
        "Social Science",
    ),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": (
        "Ideological and Moral Cultivation",
        "思想道德修养与法律基础",
        "Humanities",
    ),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": (
        "Chinese Language and Literature",
        "中国语言文学",
        "Humanities",
    ),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": (
        "Environmental Impact Assessment Engineer",
        "环境影响评价工程师",
        "Other",
    ),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}

CEVAL_HARD: frozenset[str] = frozenset(
    {
        "advanced_mathematics",
        "discrete_mathematics",
        "probability_and_statistics",
        "college_physics",
        "college_chemistry",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_chemistry",
    }
)

GSM8K_SHOTS: tuple[tuple[str, str, str], ...] = (
    (
        "In 2004, there were 60 kids at a cookout. In 2005, half the number of kids came to the cookout as compared to 2004. In 2006, 2/3 as many kids came to the cookout as in 2005. How many kids came to the cookout in 2006?",
        "In 2005, 60/2=30 kids came to the cookout.\nIn 2006, 30/3*2=20 kids came to the cookout.",
        "20",
    ),
    (
        "Zilla spent 7% of her monthly earnings on rent, half of it on her other monthly expenses, and put the rest in her savings. If she spent $133 on her rent, how much does she deposit into her savings account in a month?",
        "Since $133 is equal to 7% of her earnings, then 1% is equal to $133/7 = $19.\nThe total monthly earning of Zilla is represented by 100%, so $19 x 100 = $1900 is her monthly earnings.\nSo, $1900/2 = $950 is spent on her other monthly expenses.\nThe total amount spent on the rent and other monthly expenses is $133 + $950 = $1083.\nHence, she saves $1900 - $1083 = $817 per month.",
        "817",
    ),
    (
        "If Buzz bought a pizza with 78 slices at a restaurant and then decided to share it with the waiter in the ratio of 5:8, with Buzz's ratio being 5, what's twenty less the number of slices of pizza that the waiter ate?",
        "The total ratio representing the slices of pizza that Buzz bought is 5+8=13\nIf he shared the slices of pizza with the waiter, the waiter received a fraction of 8/13 of the total number of slices, which totals 8/13 * 78 = 48 slices\nTwenty less the number of slices of pizza that the waiter ate is 48-20 = 28",
        "28",
    ),
    (
        "Jame gets a raise to $20 per hour and works 40 hours a week.  His old job was $16 an hour for 25 hours per week.  How much more money does he make per year in his new job than the old job if he works 52 weeks a year?",
        "He makes 20*40=$800 per week\nHe used to make 16*25=$400 per week\nSo his raise was 800-400=$400 per week\nSo he makes 400*52=$20,800 per year more",
        "20800",
    ),
    (
        "Mr. Gardner bakes 20 cookies, 25 cupcakes, and 35 brownies for his second-grade class of 20 students. If he wants to give each student an equal amount of sweet treats, how many sweet treats will each student receive?",
        "Mr. Gardner bakes a total of 20 + 25 + 35 = 80 sweet treats\nEach student will receive 80 / 20 = 4 sweet treats",
        "4",
    ),
    (
        "A used car lot has 24 cars and motorcycles (in total) for sale. A third of the vehicles are motorcycles, and a quarter of the cars have a spare tire included. How many tires are on the used car lot’s vehicles in all?",
        "The used car lot has 24 / 3 = 8 motorcycles with 2 tires each.\nThe lot has 24 - 8 = 16 cars for sale\nThere are 16 / 4 = 4 cars with a spare tire with 5 tires each.\nThe lot has 16 - 4 = 12 cars with 4 tires each.\nThus, the used car lot’s vehicles have 8 * 2 + 4 * 5 + 12 * 4 = 16 + 20 + 48 = 84 tires in all.",
        "84",
    ),
    (
        "Norma takes her clothes to the laundry. She leaves 9 T-shirts and twice as many sweaters as T-shirts in the washer. When she returns she finds 3 sweaters and triple the number of T-shirts. How many items are missing?",
        "Norma left 9 T-shirts And twice as many sweaters, she took 9 * 2= 18 sweaters\nAdding the T-shirts and sweaters, Norma left 9 + 18 = 27 clothes\nWhen she came back, she found 3 sweaters And triple the number of T-shirts, she found 3 * 3 = 9 T-shirts\nAdding the T-shirts and sweaters, Norma found 3 + 9 = 12 clothes\nSubtracting the clothes she left from the clothes she found, 27 - 12 = 15 clothes are missing",
        "15",
    ),
    (
        "Adam has an orchard. Every day for 30 days he picks 4 apples from his orchard. After a month, Adam has collected all the remaining apples, which were 230. How many apples in total has Adam collected from his orchard?",
        "During 30 days Adam picked 4 * 30 = 120 apples.\nSo in total with all the remaining apples, he picked 120 + 230 = 350 apples from his orchard.",
        "350",
    ),
)

GSM8K_CHAT_SHOTS: tuple[tuple[str, str, str], ...] = (
    (
        "Angelo and Melanie want to plan how many hours over the next week they should study together for their test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. They figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for each worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to study total over the next week if they take a 10-minute break every hour, include 3 10-minute snack breaks each day, and 30 minutes for lunch each day?",
        "Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 chapters = 6 hours total.\nFor the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 hours x 4 worksheets = 6 hours total.\nAngelo and Melanie need to start with planning 12 hours to study, at 4 hours a day, 12 / 4 = 3 days.\nHowever, they need to include time for breaks and lunch. Every hour they want to include a 10-minute break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\nThey also want to include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\nAnd they want to include 30 minutes for lunch each day, so 120 minutes for breaks + 30 minutes for snack breaks + 30 minutes for lunch = 180 minutes, or 180 / 60 minutes per hour = 3 extra hours.\nSo Angelo and Melanie want to plan 12 hours to study + 3 hours of breaks = 15 hours total.\nThey want to study no more than 4 hours each day, 15 hours / 4 hours each day = 3.75\nThey will need to plan to study 4 days to allow for all the time they need.",
        "4",
    ),
    (
        "Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents score double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points scored by both teams added together?",
        "Mark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\nHis team also scores 6 3 pointers, meaning they scored 8*3= 24 points in 3 pointers\nThey scored 10 free throws, and free throws count as one point so they scored 10*1=10 points in free throws.\nAll together his team scored 50+24+10= 84 points\nMark's opponents scored double his team's number of 2 pointers, meaning they scored 50*2=100 points in 2 pointers.\nHis opponents scored half his team's number of 3 pointers, meaning they scored 24/2= 12 points in 3 pointers.\nThey also scored half Mark's team's points in free throws, meaning they scored 10/2=5 points in free throws.\nAll together Mark's opponents scored 100+12+5=117 points\nThe total score for the game is both team's scores added together, so it is 84+117=201 points",
        "201",
    ),
    (
        "Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. If she buys 2/5 times more of each item, what would be the total number of the items she will have if she currently has 60 marbles?",
        "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = 24\nThe total number of marbles she'll have is 60+24 = 84\nIf Bella currently has 60 marbles, and she has two times as many marbles as frisbees, she has 60/2 = 30 frisbees.\nIf Bella buys 2/5 times more frisbees, she'll have 2/5*30 = 12 more frisbees.\nThe total number of frisbees she'll have will increase to 30+12 = 42\nBella also has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\nIf she buys 2/5 times more deck cards, she'll have 2/5*10 = 4 more deck cards.\nThe total number of deck cards she'll have is 10+4 = 14\nTogether, Bella will have a total of 14+42+84 = 140 items",
        "140",
    ),
    (
        "A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three baskets and 2 less of each fruit in the fourth basket. How many fruits are there?",
        "For the first three baskets, the number of apples and oranges in one basket is 9+15=24\nIn total, together with bananas, the number of fruits in one basket is 24+14=38 for the first three baskets.\nSince there are three baskets each having 38 fruits, there are 3*38=114 fruits in the first three baskets.\nThe number of apples in the fourth basket is 9-2=7\nThere are also 15-2=13 oranges in the fourth basket\nThe combined number of oranges and apples in the fourth basket is 13+7=20\nThe fourth basket also contains 14-2=12 bananas.\nIn total, the fourth basket has 20+12=32 fruits.\nThe four baskets together have 32+114=146 fruits.",
        "146",
    ),
)

MATH_SHOTS: tuple[tuple[str, str], ...] = (
    (
        "Problem:\nFind the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}\nSolution:",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.\n",
    ),
    (
        "Problem:\nIf $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$\nSolution:",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.\n",
    ),
    (
        "Problem:\nTerrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?\nSolution:",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight. If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight. Equating this to 480 pounds, we can solve for $n$: \\begin{align*} 30n&=480\\\\ \\Rightarrow\\qquad n&=480/30=\\boxed{16} \\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.\n",
    ),
    (
        "Problem:\nIf the system of equations: \\begin{align*} 6x-4y&=a,\\\\ 6y-9x &=b. \\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is nonzero.\nSolution:",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain $$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have $$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.\n",
    ),
)

MBPP_SHOTS: tuple[tuple[str, str], ...] = (
    (
        "You are an expert Python programmer, and here is your task: Write a function to find the similar elements from the given two tuple lists. Your code should pass these tests:\n\n assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4) \n assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14) \n",
        "[BEGIN]\n 'def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res)' \n[DONE] \n\n ",
    ),
    (
        "You are an expert Python programmer, and here is your task: Write a python function to identify non-prime numbers. Your code should pass these tests:\n\n assert is_not_prime(2) == False \n assert is_not_prime(10) == True \n assert is_not_prime(35) == True \n",
        "[BEGIN]\n 'import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True\r\n    return result' \n[DONE] \n\n ",
    ),
    (
        "You are an expert Python programmer, and here is your task: Write a function to find the largest integers from a given list of numbers using heap queue algorithm. Your code should pass these tests:\n\n assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35] \n",
        "[BEGIN]\n 'import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n  return largest_nums' \n[DONE] \n\n ",
    ),
)
