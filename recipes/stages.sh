# Shared by the stage-numbered recipes (recipes/<corpus>/run*.sh), which source it with their
# arguments, as Kaldi recipes source utils/parse_options.sh:
#
#   <recipe> [--stage N] [--stop-stage M] [--corpus-dir DIR] [--again] [--redo] [--verify] [--publish] [-- hydra overrides...]
#
# --again runs with the last run's --corpus-dir and overrides (this recipe's, kept in
# exp/.<recipe>.args), the overrides given now following them (and winning): add an eval set
# with `--again -- 'eval_sets=[test,new]'` without typing the rest again.
# --verify compares the SHA-256 of every input file with its stage record (Hydra: verify=true).
# A recipe writes its reports under its exp dir (exp/report) and never into the repository's
# results/: --publish (after the stages, or alone: the stages then skip as current) merges them
# into results/<corpus>/ (`asrkd publish`), the committed copies README quotes.
# A stage whose outputs were made with the same config and inputs is skipped; one whose config
# or inputs changed is refused with what changed, unless --redo (Hydra: redo=true) remakes it.
#
# It sets $stage, $stop_stage, $corpus_dir (absolute: a relative --corpus-dir is read from where
# the recipe is run; default: what the recipe set before sourcing), as is a relative
# results_dir= or graph.lm_arpa= override (the recipe's own results_dir is $root/results/<corpus>),
# $overrides, $root (the repository); moves into the recipe's dir (its data/ and exp/); puts
# the repository on PYTHONPATH (for local/); exports ASRKD_RECIPE_COMMAND (reports record it:
# the recipe with its --corpus-dir and overrides, not --stage/--stop-stage/--redo, since a stage
# that is not rerun is skipped only when current, so a partial run reports what a whole one
# would; a recipe that runs other recipes' stages is the one recorded); and defines run_stage.

stage=0
stop_stage=100
redo=
verify=
publish=
again=
corpus_dir=${corpus_dir:-}
overrides=()
recipe_args=()
recipe_dir=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$recipe_dir/../.." && pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --corpus-dir)  # relative to where the recipe is run from, not to the recipe's dir it moves into
      case "$2" in /*) corpus_dir=$2 ;; *) corpus_dir=$PWD/$2 ;; esac
      recipe_args+=(--corpus-dir "$2"); shift 2 ;;
    --again) again=true; shift ;;
    --redo) redo=true; shift ;;
    --verify) verify=true; shift ;;
    --publish) publish=true; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "usage: $0 [--stage N] [--stop-stage M] [--corpus-dir DIR] [--again] [--redo] [--verify] [--publish] [-- hydra overrides]" >&2; exit 1 ;;
  esac
done
[ ${#overrides[@]} -eq 0 ] || recipe_args+=(-- "${overrides[@]}")
for i in "${!overrides[@]}"; do  # a relative results_dir= or graph.lm_arpa= is read from where the recipe is run, as --corpus-dir
  for key in results_dir graph.lm_arpa; do
    case "${overrides[$i]}" in "$key"=/*) ;; "$key"=?*) overrides[$i]="$key=$PWD/${overrides[$i]#"$key"=}" ;; esac
  done
done
last_run=$recipe_dir/exp/.$(basename "$0").args  # line 1: the corpus dir; then one override a line (relative paths resolved)
if [ -n "$again" ]; then
  [ -f "$last_run" ] || { echo "$0: --again: no earlier run of this recipe recorded ($last_run)" >&2; exit 1; }
  mapfile -t remembered < "$last_run"
  [ -n "$corpus_dir" ] || corpus_dir=${remembered[0]}
  overrides=("${remembered[@]:1}" ${overrides[@]+"${overrides[@]}"})
  recipe_args=()
  [ -z "$corpus_dir" ] || recipe_args+=(--corpus-dir "$corpus_dir")
  [ ${#overrides[@]} -eq 0 ] || recipe_args+=(-- "${overrides[@]}")
fi
if [ -z "${ASRKD_OUTER_RECIPE:-}" ]; then  # a recipe run by another (run_paper.sh) records the outer one, and remembers nothing
  export ASRKD_RECIPE_COMMAND="${recipe_dir#"$root"/}/$(basename "$0")${recipe_args[*]:+ ${recipe_args[*]}}"
  export ASRKD_OUTER_RECIPE=$0
  mkdir -p "$recipe_dir/exp"
  printf '%s\n' "$corpus_dir" ${overrides[@]+"${overrides[@]}"} > "$last_run"
fi
[ -z "${redo:-}" ] || overrides=(redo=true ${overrides[@]+"${overrides[@]}"})
[ -z "${verify:-}" ] || overrides=(verify=true ${overrides[@]+"${overrides[@]}"})
cd "$recipe_dir"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

run_stage() {  # run_stage N description command...
  local n=$1 what=$2; shift 2
  if [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; then
    echo "$(date '+%F %T') stage $n: $what"
    "$@"
  fi
}

publish_to() {  # publish_to RESULTS_DIR overrides...: with --publish, `asrkd publish` of this run's reports there
  local dest=$1; shift
  if [ -n "${publish:-}" ]; then
    echo "$(date '+%F %T') publish: the reports of this run into $dest"
    asrkd publish "results_dir=$dest" "$@"  # a results_dir= among the overrides goes first
  fi
}
