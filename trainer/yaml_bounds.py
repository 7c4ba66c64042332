"""Bounds on recipe YAML, checked before any loader builds it: size, nesting depth, and the number of
values after alias expansion. Each fault is a ValueError whose message is one line (kiln.trainer.config
raises it as a ConfigError)."""
import yaml

# A recipe is a few hundred lines; these bounds stop a hostile one (a "billion laughs" of nested
# aliases expands to 10^9 nodes from a few hundred bytes) before anything expands it.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 10_000  # OmegaConf (2.4) stops at 10,000 too, with advice of its own


MAX_RECIPE_DEPTH = 100


def _nesting(text: str) -> int:
    """An upper bound of a YAML text's nesting depth: the deepest flow brackets ([ {) outside quotes,
    or the widest indentation, whichever is larger."""
    deepest = depth = 0
    for line in text.splitlines():
        deepest = max(deepest, len(line) - len(line.lstrip(" ")))
        quote = ""
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch in "]}":
                depth = max(0, depth - 1)
    return deepest


def _expanded_nodes(node, memo: dict, depth: int = 0) -> int:
    """Nodes of a composed YAML tree counted as if every alias were expanded (each shared node is
    counted once per reference, computed once); a self-referencing alias counts as unbounded."""
    key = id(node)
    if key in memo:
        if memo[key] is None:  # still being counted: the node contains itself
            return MAX_RECIPE_NODES + 1
        return memo[key]
    if depth > 200:
        return MAX_RECIPE_NODES + 1
    memo[key] = None
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_nodes(c, memo, depth + 1) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_nodes(k, memo, depth + 1) + _expanded_nodes(v, memo, depth + 1) for k, v in node.value)
    memo[key] = n = min(n, MAX_RECIPE_NODES + 1)
    return n


def check_yaml_size(text: str, what: str):
    """ValueError if YAML `text` is too big, or would expand (aliases) past MAX_RECIPE_NODES; its
    composed root node (None when it is not valid YAML: the loader then reports where)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise ValueError(f"{what} is {len(text):,} characters, more than a recipe needs "
                         f"({MAX_RECIPE_BYTES:,} at most): is it the right file?")
    if _nesting(text) > MAX_RECIPE_DEPTH:  # PyYAML composes recursively: refuse before the stack runs out
        raise ValueError(f"{what} nests lists or mappings too deeply for a recipe (more than "
                         f"{MAX_RECIPE_DEPTH} levels): flatten it")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None  # the loader reports the syntax error with its line and column
    except RecursionError:  # PyYAML composes nested flow collections recursively
        raise ValueError(f"{what} nests lists or mappings too deeply for a recipe: flatten it") from None
    if node is not None and _expanded_nodes(node, {}) > MAX_RECIPE_NODES:
        raise ValueError(f"{what} expands to more than {MAX_RECIPE_NODES:,} values through YAML aliases "
                         "(&anchor / *alias), or refers to itself: write the values out, or use fewer aliases")
    return node
