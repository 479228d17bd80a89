"""The 10 ECInstruct tasks, once: names, abbreviations, the reference code's spellings, answer format, option
letters, primary metric, instruction pools. `ecellm.data`, `ecellm.metrics`, `ecellm.eval` and `ecellm.synthetic`
read this table; the facts come from the project spec `ECINSTRUCT.md`.

    resolve_task("sr")                       # "Sequential_Recommendation" (the name in the data)
    task_abbr("Query_Product_Ranking")       # "QPR" (the reference evaluation's spelling)
    TASK_BY_ABBR["SA"].metric                # "macro_f1"
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    """One ECInstruct task.

    Args:
        abbr: the paper's abbreviation (AVE, PRP, ...).
        name: the task name in the data's `task` field.
        category: the paper's task group.
        has_ood: whether the dataset has an OOD test split for it.
        aliases: other spellings (the reference evaluation script's).
        answer: the answer format, which decides how `ecellm.metrics.score` parses and scores it: "triples" (a JSON
            list of attribute/value/source objects), "option" (an option letter, optionally followed by its
            text), "yes_no", "letter" (exactly one letter), "ranking" (comma-separated letters), "text" (free text).
        options: the option letters of the task's `options` field, "" for tasks without options.
        metric: the key of the primary figure in `ecellm.metrics.score`'s result.
        instructions: the 5 instructions of the diverse-instruction pool; the last is the seed instruction.
        unseen_instruction: the held-out paraphrase of the `*_Unseen_Instruction` settings.
    """

    abbr: str
    name: str
    category: str
    has_ood: bool
    aliases: tuple[str, ...]
    answer: str
    options: str
    metric: str
    instructions: tuple[str, ...]
    unseen_instruction: str

    @property
    def seed_instruction(self) -> str:
        return self.instructions[-1]


TASKS = (
    TaskInfo(
        'AVE', 'Attribute_Value_Extraction', 'Product Understanding', has_ood=True,
        aliases=(),
        answer='triples', options='', metric='f1',
        instructions=(
            'Extract the value of the target attribute from the given product information and output it along with the corresponding source.',
            'Parse the product information to locate the target attribute, and then provide the extracted value of the target attribute and its source in the output, specifying None if the attribute is not present.',
            'First, identify the target attributes from the provided list. Then, scan the product title, description, feature, and brand to extract the values associated with each target attribute. Finally, create a list of dictionaries, each containing the extracted attribute, its corresponding value, and the source where it was found.',
            "Using the product's title, description, features, price, and brand, identify and retrieve the values associated with a specified set of target attributes. Output the extracted values along with their respective sources (e.g., title or feature) indicating where each value was found.",
            'Given the title, description, feature, price, and brand of a product and a set of target attributes, extract the value of each target attribute from the product information. Output the extracted value and the corresponding source (e.g., title or feature) denoting where the value is extracted.',
        ),
        unseen_instruction='Retrieve the value associated with the target attribute from the product information and specify the source (e.g., title, description, feature, or title) where the value was found.',
    ),
    TaskInfo(
        'PRP', 'Product_Relation_Prediction', 'Product Understanding', has_ood=True,
        aliases=('Product_Relation_Predicition',),
        answer='option', options='ABC', metric='macro_f1',
        instructions=(
            'Analyze the titles of Product 1 and Product 2 to determine if they are similar, if they will be purchased or viewed together, and choose the corresponding option.',
            'Evaluate the titles of Product 1 and Product 2, then choose the option that best describes the relation between the two products.',
            'Evaluate the titles of Product 1 and Product 2 to assess their similarity and whether they are likely to be purchased or viewed together. Then, select the appropriate option.',
            'Predict whether two products are similar, whether two products are likely to be purchased or viewed together based on their titles. Choose your answer from the provided options.',
            'Given the title of two products, predict if the two products are similar, if the two products will be purchased or viewed together. Answer only from the options.',
        ),
        unseen_instruction='Analyze the titles of Product 1 and Product 2 and select the option that indicates the relation of the two products.',
    ),
    TaskInfo(
        'PM', 'Product_Matching', 'Product Understanding', has_ood=False,
        aliases=(),
        answer='yes_no', options='', metric='f1',
        instructions=(
            'Analyze the title, description, manufacturer, and price between the two products below and generate an output of yes if the two products are the same, otherwise respond with no.',
            'Check the details of the two products to see if they refer to the same product. Output only yes or no.',
            'Based on the product information, predict if the two products are identical or not. Output yes if they are identical or no otherwise.',
            'Compare the details of two given products to determine if they are identical. Output yes if they are identical or no otherwise.',
            'Given the title, description, manufacturer, and price of two products, identify if they are the same product. Only output yes or no.',
        ),
        unseen_instruction='Determine whether the two products are the same by comparing their title, description, manufacturer, and price, and provide a simple yes or no answer as the output.',
    ),
    TaskInfo(
        'SA', 'Sentiment_Analysis', 'User Understanding', has_ood=True,
        aliases=(),
        answer='option', options='ABCDE', metric='macro_f1',
        instructions=(
            "Assess the user's sentiment in the provided review and select the appropriate sentiment option from the list as the answer.",
            'Determine the sentiment expressed by the user in her review from the provided choices, and respond by selecting one of the available options.',
            "Carefully assess the user's review for any strong expressions of sentiment, either positive or negative. Based on your analysis, select the most fitting sentiment option from the provided list as output.",
            "Analyze the user's review text and determine the overall sentiment expressed, then choose the corresponding sentiment option from the provided list (A: very positive, B: positive, C: neutral, D: negative, E: very negative) based on the identified sentiment.",
            "Given the user's review, identify the user's sentiment from the listed options. Answer using one of the options.",
        ),
        unseen_instruction="Analyze the user's review and determine the sentiment based on the listed options.",
    ),
    TaskInfo(
        'SR', 'Sequential_Recommendation', 'User Understanding', has_ood=True,
        aliases=(),
        answer='letter', options='ABCDEFGHIJKLMNOPQRST', metric='hr@1',
        instructions=(
            "Based on the user's historical purchases, rank the items in options and predict the next product of the user's interest from the provided options.",
            "Rank the items in options and predict the user's next purchase from the listed options by analyzing her historical purchases.",
            "The user's purchase history implies her preferences. Rank the items in the options based on the user's preferences. Output the item that the user is most likely to purchase next from the options.",
            "Rank items in listed options based on the user's purchase history to determine the item that the user is most likely to purchase next. Output the item with the highest likelihood of being the next purchase.",
            'Given the products the user has purchased in history, rank the items in the listed options and output the item that the user is most likely to purchase next. Answer from one of the options.',
        ),
        unseen_instruction="Estimate the user's intent based on the user's purchase history, and predict the next product that the user is most likely to purchase from the given options.",
    ),
    TaskInfo(
        'MPC', 'Multiclass_Product_Classification', 'Query Product Matching', has_ood=False,
        aliases=(),
        answer='option', options='ABCD', metric='accuracy',
        instructions=(
            'Analyze the query and product title to determine the relevance between the query and product, and select the appropriate option from the provided options.',
            'Evaluate the relevance between the query and product title, and choose the most accurate option from the given options.',
            'Analyze the query and product title to assess the level of relevance between them, and then output the corresponding option that best describes this relevance.',
            'Determine the relevance between the query and the product title provided, and select your response from one of the available options.',
            'What is the relevance between the query and the product title below? Answer from one of the options.',
        ),
        unseen_instruction='Compare the query and the product title to determine if the product fully meets the query specifications. Choose the option that best describes the relevance between them.',
    ),
    TaskInfo(
        'PSI', 'Product_Substitute_Identification', 'Query Product Matching', has_ood=False,
        aliases=('Product_Substitue_Identification',),
        answer='yes_no', options='', metric='f1',
        instructions=(
            'Answer yes if the product is a substitute for the query and no otherwise.',
            'Please respond with yes if the product is a suitable substitute for the query, and no if it is not.',
            "Check if a product can function as a substitute for a given query, even if it doesn't fully meet all requirements. Output yes if it can or no otherwise.",
            'Assess the relevance of a product to a given query by determining if it can function as a substitute, despite not fully meeting certain aspects of the query. Provide a binary output of yes or no based on this evaluation.',
            'Given a query and a product, identify if the product is somewhat relevant to the query. It fails to fulfill some aspects of the query but the product can be used as a functional substitute. Only output yes or no.',
        ),
        unseen_instruction='Assess whether the product is a substitute for the query and provide a yes or no response.',
    ),
    TaskInfo(
        'QPR', 'Query_Product_Rank', 'Query Product Matching', has_ood=False,
        aliases=('Query_Product_Ranking',),
        answer='ranking', options='', metric='ndcg',
        instructions=(
            'Evaluate each product title in the given list, assess its relevance to the given query, and then arrange the products in descending order of relevance, with the most relevant product at the top of the ranked list.',
            'Rank the products A, B, C, ... based on their relevance to the provided query, and produce a ranked list with the most relevant product positioned at the top of the list.',
            'Analyze the query and each product title. Sort the products in descending order based on their relevance to the query. The most relevant product should be at the top of the list, and output the ranked list.',
            'Evaluate the relevance of each product title in the input to the given query, and then sort the products in descending order of relevance, placing the most relevant product at the top of the ranked list.',
            'Given a query and a list of products denoted as A, B, C, ... with their titles, rank the products according to their relevance to the query. Output only a ranked list in which the most relevant product is at the top of the list.',
        ),
        unseen_instruction="Evaluate the query against each product's title, determine the relevance between the query and the product, and organize the products in descending order of relevance, ensuring that the product with the highest relevance is positioned at the top of the list.",
    ),
    TaskInfo(
        'AP', 'Answerability_Prediction', 'Product Question Answering', has_ood=True,
        aliases=(),
        answer='yes_no', options='', metric='f1',
        instructions=(
            'Evaluate the answerability of a question by analyzing the related document, outputting yes if the document contains information addressing the question, and no otherwise.',
            'Analyze a question and its supporting document. Predicting answerability based on the information provided in the document. Output yes if the document contains relevant information to answer the question, otherwise output no.',
            'Given a question and its related document, determine if the question is answerable by analyzing the information in the document. Output yes if the document addresses the question, or no otherwise.',
            'Output yes if the supporting document can answer the given question. Otherwise, output no.',
            'Given a question and the related document, predict if the question is answerable based on the information provided in the document. Output only yes or no.',
        ),
        unseen_instruction='Predict whether it is possible to answer the given question using the supporting document, and output a yes or no response.',
    ),
    TaskInfo(
        'AG', 'Answer_Generation', 'Product Question Answering', has_ood=True,
        aliases=(),
        answer='text', options='', metric='f_bert',
        instructions=(
            'Generate an answer to the question by utilizing the information contained in the document.',
            'Extract information from the supporting document to answer the given question.',
            'Answer the given question using the supporting document.',
            'Answer the given question by extracting information from the supporting document.',
            'Given a question and the related document, and generate the answer to the question based on the information provided in the document.',
        ),
        unseen_instruction='Utilize the information provided in the supporting document to generate an answer to the given question.',
    ),
)

# The evaluation settings (in-domain or out-of-domain, times the instruction kinds); `setting` field of a record.
SETTINGS = (
    "IND_Diverse_Instruction", "OOD_Diverse_Instruction", "IND_Single_Instruction", "OOD_Single_Instruction",
    "IND_Unseen_Instruction", "OOD_Unseen_Instruction", "IND_Diverse_Instruction_1-shot",
    "OOD_Diverse_Instruction_1-shot",
)
TASK_BY_ABBR = {t.abbr: t for t in TASKS}
TASK_BY_NAME = {t.name: t for t in TASKS}


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


_LOOKUP = {_key(key): t for t in TASKS for key in (t.abbr, t.name, *t.aliases)}


def task_info(name: str) -> TaskInfo:
    """The `TaskInfo` of a task given by full name, abbreviation or reference-code spelling.

    Case, surrounding spaces and spaces for underscores are ignored: "SR", "sr", "Sequential Recommendation" and
    "Sequential_Recommendation" all name the same task; so does "Product_Substitue_Identification" (the reference's
    spelling) for "Product_Substitute_Identification".

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    info = _LOOKUP.get(_key(name)) if isinstance(name, str) else None
    if info is None:
        raise ValueError(f"unknown task {name!r}; expected one of {[t.abbr for t in TASKS]} "
                         f"or their full names {[t.name for t in TASKS]}")
    return info


def resolve_task(name: str) -> str:
    """The task name used in the data (e.g. "Sequential_Recommendation") for any name `task_info` accepts."""
    return task_info(name).name


def task_abbr(name: str) -> str:
    """The abbreviation (e.g. "QPR") for any name `task_info` accepts."""
    return task_info(name).abbr
