"""Whether the Python a checkpoint folder ships is moeify's own, and what it would run otherwise.

A folder whose config.json has `auto_map` names modules of its own; transformers imports them
(arbitrary code) when asked to trust it. moeify's remote outputs carry the two files moeify ships.
When they are byte for byte a version moeify shipped, moeify may load the folder without the
user's consent, with its own copy of those classes, so no file of the folder is imported at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from moeify.targets.remote import CODE_DIR, CODE_FILES

# The only auto_map entries a moeify output has (targets.remote writes exactly these).
MOEIFY_AUTO_MAP = {"AutoConfig": "configuration_moeify.MoeifyConfig",
                   "AutoModelForCausalLM": "modeling_moeify.MoeifyForCausalLM"}

# sha256 of every committed version of the remote code (`git log -p -- moeify/targets/remote_code/`),
# so outputs written by earlier moeify versions load too. The version in this package is accepted
# as well (computed, see known_hashes). When the remote code changes, add the outgoing version here:
# tests/test_trust.py checks that every version in git history is listed.
SHIPPED: dict[str, frozenset[str]] = {
    "configuration_moeify.py": frozenset({
        "a071f6ffb912adcf6e157f339b7c1d75c20f1f21ece040fde1acecd37505a142",  # f3a196a
        "faf5d154b5460e8beb9d35286801f2d16f9542233e26fe37821f314570ba6bd2",  # d7d9a04
        "6f91f61c788455fe2a9a781a335a86000d2cee1e059ff18fe1f53263b258f7e1",  # 9db558f
        "1ae499b905d06a5c356dea642237dd1ebf0804be4e9a61597c00476a349a1536",  # e438066
        "8a86b9baa6f80329fb48febc282a9493179eccecdb9c398014ae6c0bef4cac49",  # 9cc6133
    }),
    "modeling_moeify.py": frozenset({
        "cf33139cbfa7c5a7d930acf5073b86972646f9c3aee2831dc6bfcf8d7de76972",  # f3a196a
        "47162c52cc468fd63347e89389198a120ea444ba78a901dcaceb8aa90ae37865",  # ddd6f8e
        "49c114c09ada75ead02f12afb5a16e977f9b13b9e9105cd430b5489e795a0afe",  # d7d9a04
        "9b4df51b5cb6a7bc582de720f97894714eea067fbda0939cfa63d6af01f98324",  # 1925163
        "d4f727a80bee67dfbdd3075daf1af9ad5297c4172423f297d2f63faa66d8ab42",  # 9db558f
        "8a81230323159f082382c1d9e94652a811d821eb6f4dce9e5a7b97a89ce1f402",  # d222729
        "527d5965382a0075fd1e5668ec86af35cac9fc38cc94edd63ead14402178256e",  # 55f06d0
        "ea9897247077466b4d6f0ba3ae4ef3c85a224ad9b984b12d93d8b5174a152e28",  # effa713
        "378484d4e9d174ad7f492060f62481be832464468dabcb83d36e877af48dc8e4",  # 1b122bf
        "58af862ea1de2906b0fad1535eaecdd6362e2c09716a734c75f580a5a4a306a3",  # 17d7b1f
        "da8c785bbd693d0c5becae540d95c489cc431fb07476a77f0ed26680dee85725",  # 4bb6c8e
        "282dc64bcf4cfbb6e738ef5cd01261e540fa970d9b0d3bee2b9f4f07f3420931",  # e438066
        "2ea2ba1938dc07fa4c3e9a0cedc7f44aa212cc054aa055c3d53706ed7bc07bb8",  # 14eb630
        "bd9ef2e65f84354ff3a0f587945d2c95e9f5ecc8fb6c1a229470a4d6a5352ca7",  # 9cc6133
        "a80638d13c8bc3605263c8fe4662d4313b045460e8995eac74d5386ef60b683d",  # 0ec5238
    }),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def known_hashes(name: str) -> frozenset[str]:
    """Every version of one remote-code file moeify accepts as its own: shipped before, or in this package."""
    return SHIPPED[name] | {sha256(CODE_DIR / name)}


def code_refs(auto_map: object) -> Iterator[str]:
    """Every class reference of an auto_map ("module.Class", "repo--module.Class"; tokenizers list pairs)."""
    values = auto_map.values() if isinstance(auto_map, dict) else auto_map if isinstance(auto_map, list) else ()
    for value in values:
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str):
                yield ref


def code_files(auto_map: object) -> list[str]:
    """The Python files an auto_map would import, as a user would look for them."""
    files = []
    for ref in code_refs(auto_map):
        repo, _, local = ref.rpartition("--")
        module = local.rpartition(".")[0] or local
        files.append(f"{module}.py" + (f" of the Hub repo {repo}" if repo else ""))
    return list(dict.fromkeys(files))


def is_moeify_code(folder: Path, auto_map: object) -> bool:
    """The auto_map points only at moeify's classes, and both files are a version moeify shipped."""
    if not isinstance(auto_map, dict) or not auto_map:
        return False
    if any(MOEIFY_AUTO_MAP.get(key) != ref for key, ref in auto_map.items()):
        return False
    files = [Path(folder) / name for name in CODE_FILES]  # modeling imports configuration: both count
    return all(f.is_file() and sha256(f) in known_hashes(f.name) for f in files)
