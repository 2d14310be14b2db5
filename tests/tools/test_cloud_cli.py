from pathlib import Path

import pytest

from lmlab.tools.catalog import Catalog, Example, Parameter, Tool
from lmlab.tools.cloud_cli import (
    CliBenchmarkConfig,
    aggregate,
    build_benchmark,
    compare,
    extract_command,
    join_continuations,
    parse_command,
    validate,
)
from lmlab.tools.manpages import ingest_manpages

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def cat():
    return Catalog(ingest_manpages(FIX))


def test_parse_path_positionals_flags(cat):
    c = parse_command("gcloud demo widgets create w1 w2 -z us-east1-b --async --color red", cat)
    assert c.path == ("gcloud", "demo", "widgets", "create") and c.known
    assert c.positionals == ("w1", "w2")
    assert c.flags == {"--zone": ("us-east1-b",), "--async": (None,), "--color": ("red",)}


def test_boolean_flag_does_not_swallow_positional(cat):
    c = parse_command("gcloud demo gadgets delete --force g1", cat)
    assert c.positionals == ("g1",) and c.flags == {"--force": (None,)}


def test_flag_order_and_equals_irrelevant(cat):
    gold = "gcloud demo widgets create w1 --zone=us-east1-b --color=red"
    pred = "gcloud demo widgets create w1 --color red --zone us-east1-b"
    assert compare(gold, pred, catalog=cat).exact


def test_underscore_and_short_alias_equal(cat):
    assert compare("gcloud demo widgets create w1 --zone=a", "gcloud demo widgets create w1 -z a", catalog=cat).exact
    assert compare("gcloud demo widgets create w1 --source_image=x", "gcloud demo widgets create w1 --source-image=x",
                   catalog=cat).exact


def test_continuations_joined(cat):
    gold = "gcloud demo widgets create w1 \\\n    --zone=a \\\n    --source-image=https://x/\\\nimages/base"
    assert join_continuations(gold) == "gcloud demo widgets create w1 --zone=a --source-image=https://x/images/base"
    assert compare(gold, "gcloud demo widgets create w1 --source-image=https://x/images/base --zone=a",
                   catalog=cat).exact


def test_placeholders_match_unless_the_request_names_them(cat):
    gold = "gcloud demo widgets create example-widget --zone=ZONE --source-image=projects/MY_PROJECT/images/base"
    pred = "gcloud demo widgets create w9 --zone=us-east1-b --source-image=projects/p1/images/base"
    assert compare(gold, pred, catalog=cat).exact
    assert not compare(gold, pred, catalog=cat, request="Create a widget called example-widget").exact
    assert not compare(gold, pred.replace("/images/", "/disks/"), catalog=cat).exact


def test_scores_partial_credit(cat):
    gold = "gcloud demo widgets create w1 --zone=a --color=red"
    c = compare(gold, "gcloud demo widgets create w1 --zone=a --color=blue --async", catalog=cat)
    assert c.path_correct and c.positionals_correct and not c.exact
    assert c.flag_precision == pytest.approx(2 / 3) and c.flag_recall == 1.0
    assert c.flag_value_f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    wrong = compare(gold, "gcloud demo widgets list --zone=a", catalog=cat)
    assert not wrong.path_correct
    bad = compare(gold, "gcloud demo 'unterminated", catalog=cat)
    assert not bad.parsed and not bad.exact
    s = aggregate([c, wrong, bad])
    assert s.n == 3 and s.path_accuracy == pytest.approx(1 / 3) and s.parse_rate == pytest.approx(2 / 3)


def test_validator(cat):
    assert validate("gcloud demo widgets create w1 --zone=a --source-image=i", cat).ok
    assert validate("gcloud demo widgets create w1 -z a --source-snapshot=s --no-shiny -q --project=p", cat).ok

    def errors(cmd):
        return " | ".join(validate(cmd, cat).errors)

    assert "missing required flag --zone" in errors("gcloud demo widgets create w1 --source-image=i")
    assert "one of --source-image, --source-snapshot" in errors("gcloud demo widgets create w1 --zone=a")
    assert "missing positional argument WIDGET_NAMES" in errors("gcloud demo widgets create --zone=a --source-image=i")
    assert "unknown flag --colour" in errors("gcloud demo widgets create w --zone=a --source-image=i --colour=red")
    assert "did you mean --color" in errors("gcloud demo widgets create w --zone=a --source-image=i --colour=red")
    assert "not one of red, green, blue" in errors("gcloud demo widgets create w --zone=a --source-image=i "
                                                   "--color=pink")
    assert "takes no value" in errors("gcloud demo widgets create w --zone=a --source-image=i --async=yes")
    assert "unexpected argument g2" in errors("gcloud demo gadgets delete g1 g2")
    assert "not a documented command" in errors("gcloud demo widgets destroy w1")
    assert "must start with `gcloud`" in errors("kubectl get pods")


def test_benchmark_split_by_group_and_filters():
    tools = [Tool(f"gcloud g{i} things create", "d", examples=(
        Example("To make a thing called t1", f"gcloud g{i} things create t1"),
        Example("To make two things and count them", f"gcloud g{i} things create a b | wc -l"),
        Example("Run", f"gcloud g{i} things create x"),
        Example("To list the things", "gcloud other list"))) for i in range(40)]
    bench = build_benchmark(Catalog(tools), CliBenchmarkConfig(val_fraction=0.2, test_fraction=0.2))
    assert len(bench.examples) == 40  # one usable pair per command
    assert bench.dropped == {"shell operator": 40, "short request": 40, "calls another command": 40}
    groups = {s: {e.group for e in bench.split(s)} for s in ("train", "val", "test")}
    assert groups["train"] and groups["test"] and not groups["train"] & groups["test"]
    assert not groups["train"] & groups["val"]
    again = build_benchmark(Catalog(tools), CliBenchmarkConfig(val_fraction=0.2, test_fraction=0.2))
    assert [e.split for e in again.examples] == [e.split for e in bench.examples]  # deterministic


def test_extract_command():
    assert extract_command("Sure!\n```bash\n$ gcloud a b --c=d\n```\nDone.") == "gcloud a b --c=d"
    assert extract_command("`gcloud x y`") == "gcloud x y"
    assert extract_command("gcloud a \\\n  --b=c") == "gcloud a --b=c"
    assert extract_command("I cannot help with that.") is None


def test_extract_command_from_prose():
    assert extract_command("The command `gcloud a b` is used to do it. `gcloud c`") == "gcloud a b"
    assert extract_command("You can run gcloud a b --c=d") == "gcloud a b --c=d"


@pytest.fixture(scope="module")
def consts():
    """Commands whose examples use upper-case constants next to documented metavars (as gcloud's pages do)."""
    return Catalog([
        Tool("gcloud builds triggers create manual", "d", parameters=(
            Parameter("--name", metavar="NAME"), Parameter("--repo-type", metavar="REPO_TYPE"),
            Parameter("--labels", type="array", metavar="[KEY=VALUE,...]"))),
        Tool("gcloud spanner operations list", "d", parameters=(
            Parameter("--backup", metavar="BACKUP"), Parameter("--type", metavar="TYPE"),
            Parameter("--filter", metavar="EXPRESSION"))),
        Tool("gcloud compute instances create", "d", parameters=(
            Parameter("INSTANCE_NAME", kind="positional", required=True, metavar="INSTANCE_NAME"),
            Parameter("--size", metavar="SIZE"), Parameter("--source-instance", metavar="SOURCE_INSTANCE"),
            Parameter("--network", metavar="NETWORK"), Parameter("--copy-from", metavar="SOURCE"),
            Parameter("--spec", enum=("rsa-2048", "rsa-4096"), metavar="SPEC"),
            Parameter("--event-types", type="array", enum=("OBJECT_FINALIZE", "OBJECT_DELETE"),
                      metavar="[EVENT_TYPE,...]"))),
    ])


@pytest.mark.parametrize("gold, pred", [
    ("gcloud builds triggers create manual --name=t --repo-type=GITHUB",
     "gcloud builds triggers create manual --name=t --repo-type=BITBUCKET_SERVER"),
    # BACKUP is --backup's metavar, but in --type's value it is a constant
    ("gcloud spanner operations list --type=BACKUP", "gcloud spanner operations list --type=DATABASE"),
    ("gcloud spanner operations list --filter=status:ACTIVE", "gcloud spanner operations list --filter=status:DONE"),
])
def test_upper_case_constants_are_not_placeholders(consts, gold, pred):
    c = compare(gold, pred, catalog=consts)
    assert not c.exact and c.flag_value_f1 < 1
    assert compare(gold, gold, catalog=consts).exact


def test_documented_names_are_placeholders(consts):
    gold = ("gcloud compute instances create INSTANCE_NAME --size=SIZE --network=projects/PROJECT_ID/networks/NET_NAME "
            "--copy-from=projects/p/instances/SOURCE_INSTANCE")
    pred = ("gcloud compute instances create vm-1 --size=10GB --network=projects/p1/networks/n1 "
            "--copy-from=projects/p/instances/i9")
    assert compare(gold, pred, catalog=consts).exact
    assert compare("gcloud builds triggers create manual --name=NAME --labels=KEY1=VALUE1,KEY2=VALUE2",
                   "gcloud builds triggers create manual --name=t1 --labels=env=prod,team=ml", catalog=consts).exact
    # another flag's metavar outside a resource path is a literal
    assert not compare("gcloud compute instances create vm --size=SOURCE_INSTANCE",
                       "gcloud compute instances create vm --size=10GB", catalog=consts).exact


def test_validator_enum_values(cat, consts):
    assert validate("gcloud demo widgets create w --zone=a --source-image=i --color=COLOR", cat).ok  # its metavar
    assert validate("gcloud demo widgets create w --zone=a --source-image=i --color=RED", cat).ok
    assert not validate("gcloud demo widgets create w --zone=a --source-image=i --color=PINK", cat).ok
    assert validate("gcloud compute instances create vm --spec=RSA_4096 --event-types=OBJECT_FINALIZE,OBJECT_DELETE",
                    consts).ok
    errors = validate("gcloud compute instances create vm --event-types=OBJECT_FINALIZE,OBJECT_GONE", consts).errors
    assert errors and "is not one of OBJECT_FINALIZE, OBJECT_DELETE" in errors[0]
