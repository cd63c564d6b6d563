//! What a policy set can read of its input, and whether anything but that input and the
//! set's data can change its decisions: found once per set by walking the syntax tree of
//! every module (tests included). The walk is conservative: whatever it does not follow
//! exactly (a bare `input`, an index it cannot name, syntax it does not know) counts as
//! reading everything below that point, and a call it cannot name counts as deterministic
//! only if it is not a builtin known to depend on anything else.
//!
//! Two things use it: the engine input is built only from the parts a set reads (a part
//! no rule reads cannot change a decision), and a deterministic set's decisions are
//! remembered per thread, keyed by the exact values at every path it reads (see
//! `eval::DecisionCache`).

use regorus::unstable::{Expr, Literal, Module, Query, Ref, Rule, RuleHead};
use regorus::Value;

/// Builtins whose result depends on something other than their arguments (the clock,
/// randomness, the network, the environment) or that have an effect (output). A set that
/// calls any of them is evaluated every time. `tests` checks that every builtin regorus
/// has is classified, so an upgrade that adds one fails until it is.
pub(crate) const NONDETERMINISTIC: [&str; 11] = [
    "crypto.x509.parse_and_verify_certificates",
    "crypto.x509.parse_and_verify_certificates_with_options",
    "http.send",
    "io.jwt.decode_verify",
    "net.lookup_ip_addr",
    "opa.runtime",
    "print",
    "rand.intn",
    "time.now_ns",
    "trace",
    "uuid.rfc4122",
];

/// The result of the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reads {
    /// Paths below `input`, each read with everything under it, sorted, none a prefix of
    /// another; `None`: the whole input may be read.
    pub(crate) paths: Option<Vec<Vec<Value>>>,
    /// Why a decision may depend on more than the input read and the data (the first
    /// such call found); `None`: it cannot.
    pub(crate) nondeterministic: Option<String>,
}

impl Reads {
    pub(crate) fn of(modules: &[Ref<Module>]) -> Reads {
        let mut walk = Walk::default();
        for module in modules {
            walk.module(module);
        }
        let paths = (!walk.whole).then(|| minimal(walk.paths));
        Reads {
            paths,
            nondeterministic: walk.nondeterministic,
        }
    }

    /// The paths a decision can be remembered by: all of them, when nothing but the input
    /// read and the data decides. `None`: every decision is evaluated.
    pub(crate) fn remembered_by(&self) -> Option<&[Vec<Value>]> {
        match (&self.paths, &self.nondeterministic) {
            (Some(paths), None) => Some(paths),
            _ => None,
        }
    }

    /// Why decisions are evaluated every time (`None`: they can be remembered).
    pub(crate) fn not_remembered_because(&self) -> Option<String> {
        match (&self.paths, &self.nondeterministic) {
            (_, Some(call)) => Some(format!("it calls {call}")),
            (None, None) => Some("it can read the whole input".to_owned()),
            (Some(_), None) => None,
        }
    }

    /// The paths as text (`request.method`), for `policy` diagnostics and tests.
    pub(crate) fn describe(&self) -> Vec<String> {
        match &self.paths {
            None => vec!["input".to_owned()],
            Some(paths) => paths
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|k| match k {
                            Value::String(s) => s.to_string(),
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(".")
                })
                .collect(),
        }
    }
}

/// Sorted, deduplicated, and without any path below another one in the set.
fn minimal(mut paths: Vec<Vec<Value>>) -> Vec<Vec<Value>> {
    paths.sort();
    paths.dedup();
    let mut kept: Vec<Vec<Value>> = Vec::with_capacity(paths.len());
    for path in paths {
        // Sorted order puts a prefix right before the paths below it.
        if kept.last().is_some_and(|last| path.starts_with(last)) {
            continue;
        }
        kept.push(path);
    }
    kept
}

#[derive(Default)]
struct Walk {
    paths: Vec<Vec<Value>>,
    whole: bool,
    nondeterministic: Option<String>,
}

impl Walk {
    fn module(&mut self, module: &Module) {
        for import in &module.imports {
            // `import input.request as req`: every `req...` is below that path.
            self.expr(&import.refr);
        }
        for rule in &module.policy {
            self.rule(rule);
        }
    }

    fn rule(&mut self, rule: &Rule) {
        match rule {
            Rule::Spec { head, bodies, .. } => {
                match head {
                    RuleHead::Compr { refr, assign, .. } => {
                        self.expr(refr);
                        if let Some(a) = assign {
                            self.expr(&a.value);
                        }
                    }
                    RuleHead::Set { refr, key, .. } => {
                        self.expr(refr);
                        if let Some(k) = key {
                            self.expr(k);
                        }
                    }
                    RuleHead::Func {
                        refr, args, assign, ..
                    } => {
                        self.expr(refr);
                        args.iter().for_each(|a| self.expr(a));
                        if let Some(a) = assign {
                            self.expr(&a.value);
                        }
                    }
                }
                for body in bodies {
                    if let Some(a) = &body.assign {
                        self.expr(&a.value);
                    }
                    self.query(&body.query);
                }
            }
            Rule::Default {
                refr, args, value, ..
            } => {
                self.expr(refr);
                args.iter().for_each(|a| self.expr(a));
                self.expr(value);
            }
        }
    }

    fn query(&mut self, query: &Query) {
        for stmt in &query.stmts {
            match &stmt.literal {
                Literal::SomeVars { .. } => {}
                Literal::SomeIn {
                    key,
                    value,
                    collection,
                    ..
                } => self.membership(key.as_deref(), value, collection),
                Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => self.expr(expr),
                Literal::Every { domain, query, .. } => {
                    self.expr(domain);
                    self.query(query);
                }
            }
            // `with input.x as v` replaces, it does not read: only the value is evaluated.
            // (A `with` on a builtin is still a call of that builtin name elsewhere.)
            for w in &stmt.with_mods {
                self.expr(&w.r#as);
            }
        }
    }

    fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::String { .. }
            | Expr::RawString { .. }
            | Expr::Number { .. }
            | Expr::Bool { .. }
            | Expr::Null { .. } => {}
            Expr::Var { span, .. } => {
                if span.text() == "input" {
                    self.whole = true;
                }
            }
            Expr::RefDot { .. } | Expr::RefBrack { .. } => self.reference(expr),
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                items.iter().for_each(|i| self.expr(i));
            }
            Expr::Object { fields, .. } => {
                for (_, key, value) in fields {
                    self.expr(key);
                    self.expr(value);
                }
            }
            Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
                self.expr(term);
                self.query(query);
            }
            Expr::ObjectCompr {
                key, value, query, ..
            } => {
                self.expr(key);
                self.expr(value);
                self.query(query);
            }
            Expr::Call { fcn, params, .. } => {
                match dotted(fcn) {
                    Some(name) => {
                        if self.nondeterministic.is_none() && NONDETERMINISTIC.contains(&&*name) {
                            self.nondeterministic = Some(name);
                        }
                    }
                    None => self.expr(fcn),
                }
                params.iter().for_each(|p| self.expr(p));
            }
            Expr::UnaryExpr { expr, .. } => self.expr(expr),
            Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::AssignExpr { lhs, rhs, .. } => {
                self.expr(lhs);
                self.expr(rhs);
            }
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => self.membership(key.as_deref(), value, collection),
            // Syntax this walk does not know (a regorus extension): assume the worst.
            #[allow(unreachable_patterns)]
            _ => {
                self.whole = true;
                self.nondeterministic
                    .get_or_insert_with(|| "syntax the analysis does not know".to_owned());
            }
        }
    }

    /// `key, value in collection` (a `some … in` or a membership test).
    fn membership(&mut self, key: Option<&Expr>, value: &Expr, collection: &Expr) {
        if let Some(k) = key {
            self.expr(k);
        }
        self.expr(value);
        self.expr(collection);
    }

    /// A reference chain (`a.b[c].d`): every index is an expression that is evaluated;
    /// rooted at `input`, the longest prefix named by fields and string literals is read.
    fn reference(&mut self, expr: &Expr) {
        let mut links: Vec<&Expr> = Vec::new();
        let mut root = expr;
        while let Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } = root {
            links.push(root);
            root = refr.as_ref();
        }
        for link in &links {
            if let Expr::RefBrack { index, .. } = link {
                self.expr(index);
            }
        }
        let is_input = matches!(root, Expr::Var { span, .. } if span.text() == "input");
        if !is_input {
            self.expr(root);
            return;
        }
        let mut path = Vec::new();
        for link in links.iter().rev() {
            let key = match link {
                Expr::RefDot { field, .. } => Value::from(field.0.text()),
                Expr::RefBrack { index, .. } => match index.as_ref() {
                    Expr::String { value, .. } | Expr::RawString { value, .. }
                        if matches!(value, Value::String(_)) =>
                    {
                        value.clone()
                    }
                    _ => break,
                },
                _ => break,
            };
            path.push(key);
        }
        if path.is_empty() {
            self.whole = true;
        } else {
            self.paths.push(path);
        }
    }
}

/// `a.b.c` for a call's function named by a variable and fields.
fn dotted(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Var { span, .. } => Some(span.text().to_owned()),
        Expr::RefDot { refr, field, .. } => {
            let mut name = dotted(refr)?;
            name.push('.');
            name.push_str(field.0.text());
            Some(name)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn reads(rego: &str) -> Reads {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(
                "p.rego".to_owned(),
                format!("package p\nimport rego.v1\n{rego}\n"),
            )
            .unwrap();
        Reads::of(engine.get_modules())
    }

    #[test]
    fn static_paths_are_found_and_minimal() {
        let r = reads(
            r#"
            allow if input.request.method == "GET"
            allow if input.request.method == "HEAD"
            allow if input.identity.spiffe_id in {"a"}
            allow if input["destination"].host == "x"
            deny contains m if { some h in input.request.headers.accept; m := h }
            deny contains m if { m := input.request["headers"]["x-a"] }
            "#,
        );
        assert_eq!(
            r.describe(),
            [
                "destination.host",
                "identity.spiffe_id",
                "request.headers.accept",
                "request.headers.x-a",
                "request.method"
            ]
        );
        assert_eq!(r.nondeterministic, None);
    }

    #[test]
    fn dynamic_indexes_read_the_whole_prefix() {
        let r = reads(
            r#"
            allow if { some k; input.request.headers[k] == "x" }
            allow if { x := "kind"; input[x] == "http" }
            "#,
        );
        // `input[x]` names no member: all of it.
        assert_eq!(r.paths, None);
        let r = reads(r#"allow if { some k; input.request.headers[k] == "x"; input.mcp[0] }"#);
        assert_eq!(r.describe(), ["mcp", "request.headers"]);
    }

    #[test]
    fn a_bare_input_anywhere_reads_everything() {
        for rego in [
            "allow if count(input) > 0",
            "x := input\nallow if x.kind",
            "allow if object.get(input, [\"kind\"], 0) == \"http\"",
            "allow if { some k, _ in input; k == \"kind\" }",
            "f(i) := i.kind\nallow if f(input) == \"http\"",
        ] {
            assert_eq!(reads(rego).paths, None, "{rego}");
        }
    }

    #[test]
    fn imports_of_input_are_reads() {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(
                "p.rego".to_owned(),
                "package p\nimport rego.v1\nimport input.request as req\nallow if req.method == \"GET\"\n"
                    .to_owned(),
            )
            .unwrap();
        assert_eq!(Reads::of(engine.get_modules()).describe(), ["request"]);
    }

    #[test]
    fn with_replaces_without_reading() {
        let r = reads(
            r#"
            allow if input.kind == "http"
            test_allow if allow with input as {"kind": "http"}
            test_allow_2 if allow with input.kind as "http"
            "#,
        );
        assert_eq!(r.describe(), ["kind"]);
    }

    #[test]
    fn comprehensions_functions_and_defaults_are_walked() {
        let r = reads(
            r#"
            default allow := false
            default level := input.defaults.level
            names := {n | some n in input.mcp.tools}
            f(x) := y if y := concat("/", [x, input.request.path])
            allow if { every t in input.approval.tools { t != input.gateway.route } }
            "#,
        );
        assert_eq!(
            r.describe(),
            [
                "approval.tools",
                "defaults.level",
                "gateway.route",
                "mcp.tools",
                "request.path"
            ]
        );
    }

    #[test]
    fn clock_randomness_and_output_make_a_set_nondeterministic() {
        for (rego, name) in [
            ("allow if time.now_ns() > 0", "time.now_ns"),
            ("allow if rand.intn(\"x\", 10) == 1", "rand.intn"),
            ("allow if { print(\"x\"); true }", "print"),
            ("allow if trace(\"x\")", "trace"),
        ] {
            assert_eq!(
                reads(rego).nondeterministic.as_deref(),
                Some(name),
                "{rego}"
            );
        }
        assert_eq!(
            reads("allow if time.parse_rfc3339_ns(input.time.rfc3339) > 0").nondeterministic,
            None
        );
    }

    /// Every builtin of the regorus version in use is either known to depend only on its
    /// arguments or listed in [`NONDETERMINISTIC`]. A regorus upgrade that adds builtins
    /// fails here until each new one is classified.
    #[test]
    fn every_builtin_is_classified() {
        let mut unknown: Vec<&str> = regorus::unstable::BUILTINS
            .keys()
            .copied()
            .filter(|name| {
                !NONDETERMINISTIC.contains(name) && !DETERMINISTIC_BUILTINS.contains(name)
            })
            .collect();
        unknown.sort_unstable();
        assert!(
            unknown.is_empty(),
            "classify these builtins (deterministic or NONDETERMINISTIC): {unknown:?}"
        );
    }

    /// The builtins (with this crate's regorus features) whose result is a function of
    /// their arguments.
    const DETERMINISTIC_BUILTINS: &[&str] = &[
        "__builtin_sets.intersection",
        "__builtin_sets.union",
        "abs",
        "array.concat",
        "array.reverse",
        "array.slice",
        "base64.decode",
        "base64.encode",
        "base64.is_valid",
        "base64url.decode",
        "base64url.encode",
        "base64url.encode_no_pad",
        "bits.and",
        "bits.lsh",
        "bits.negate",
        "bits.or",
        "bits.rsh",
        "bits.xor",
        "ceil",
        "concat",
        "contains",
        "count",
        "endswith",
        "floor",
        "format_int",
        "glob.match",
        "glob.quote_meta",
        "hex.decode",
        "hex.encode",
        "indexof",
        "indexof_n",
        "intersection",
        "is_array",
        "is_boolean",
        "is_null",
        "is_number",
        "is_object",
        "is_set",
        "is_string",
        "json.filter",
        "json.is_valid",
        "json.marshal",
        "json.marshal_with_options",
        "json.match_schema",
        "json.patch",
        "json.remove",
        "json.unmarshal",
        "json.verify_schema",
        "lower",
        "max",
        "min",
        "net.cidr_contains",
        "net.cidr_expand",
        "net.cidr_is_valid",
        "numbers.range",
        "numbers.range_step",
        "object.filter",
        "object.get",
        "object.keys",
        "object.remove",
        "object.subset",
        "object.union",
        "object.union_n",
        "product",
        "regex.find_all_string_submatch_n",
        "regex.find_n",
        "regex.globs_match",
        "regex.is_valid",
        "regex.match",
        "regex.replace",
        "regex.split",
        "regex.template_match",
        "replace",
        "round",
        "semver.compare",
        "semver.is_valid",
        "sort",
        "split",
        "sprintf",
        "startswith",
        "strings.any_prefix_match",
        "strings.any_suffix_match",
        "strings.count",
        "strings.replace_n",
        "strings.reverse",
        "substring",
        "sum",
        "time.add_date",
        "time.clock",
        "time.date",
        "time.diff",
        "time.format",
        "time.parse_duration_ns",
        "time.parse_ns",
        "time.parse_rfc3339_ns",
        "time.weekday",
        "to_number",
        "trim",
        "trim_left",
        "trim_prefix",
        "trim_right",
        "trim_space",
        "trim_suffix",
        "type_name",
        "union",
        "units.parse",
        "units.parse_bytes",
        "upper",
        "urlquery.decode",
        "urlquery.decode_object",
        "urlquery.encode",
        "urlquery.encode_object",
        "yaml.is_valid",
        "yaml.marshal",
        "yaml.unmarshal",
    ];
}
