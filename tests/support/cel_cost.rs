//! The API server's *estimated* cost of a CRD's `x-kubernetes-validations` rules, computed
//! offline as kube-apiserver computes it when the CRD is created, so that a rule the server would
//! refuse fails the tests instead of an install.
//!
//! A CEL interpreter evaluates rules but cannot see their cost, and kube-cel's `analysis` module
//! is a heuristic that does not cost `==` at all (it gives the rule a real server refused as
//! "more than 100x" a cost of 7). This follows the server's model for the CEL our CRDs use:
//! the static estimator of cel-go (`checker/cost.go`), the sizes Kubernetes derives from the
//! schema (`apiserver/pkg/cel/common/schemas.go`), its size estimator
//! (`apiextensions-apiserver/pkg/apiserver/schema/cel/compilation.go`), the per-rule limit with
//! the rule's cardinality, and the limit for all rules of a CRD
//! (`apiextensions/validation`). A construct it does not know fails loudly, so it never
//! under-estimates silently.

use std::collections::BTreeMap;

use cel_parser::ast::{ComprehensionExpr, Expr, IdedExpr};
use cel_parser::reference::Val;
use serde_json::Value;

/// The largest estimated cost of one rule (times its cardinality).
pub const PER_RULE_LIMIT: u64 = 10_000_000;
/// The largest estimated cost of all rules of one CRD together.
pub const PER_CRD_LIMIT: u64 = 100_000_000;
const MAX_REQUEST_SIZE: u64 = 3 * 1024 * 1024;
const STRING_TRAVERSAL_FACTOR: f64 = 0.1;
const LIST_CREATE_COST: u64 = 10;
const IDENT_OR_SELECT_COST: u64 = 1;

/// CEL's reserved words: a property with such a name is `__name__` in CEL's types.
const RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Object,
    Map,
    List,
    String,
    Bytes,
    Int,
    Double,
    Bool,
    Timestamp,
    Duration,
    /// `x-kubernetes-int-or-string`, and anything the checker cannot type.
    Dyn,
    Null,
}

impl Kind {
    fn is_scalar(self) -> bool {
        matches!(
            self,
            Kind::Bool | Kind::Double | Kind::Duration | Kind::Int | Kind::Timestamp
        )
    }
}

/// A schema node as the API server declares it to CEL (`DeclType`).
#[derive(Clone, Debug)]
struct Decl {
    kind: Kind,
    max_elements: u64,
    min_serialized_size: u64,
    /// Object properties, by their escaped CEL names.
    fields: BTreeMap<String, Decl>,
    /// List items, map values.
    element: Option<Box<Decl>>,
}

impl Decl {
    fn simple(kind: Kind, max_elements: u64, min_serialized_size: u64) -> Self {
        Self {
            kind,
            max_elements,
            min_serialized_size,
            fields: BTreeMap::new(),
            element: None,
        }
    }

    /// `SchemaDeclType`: `None` for what CEL does not see.
    fn of(schema: &Value, resource_root: bool) -> Option<Decl> {
        let max_length = schema["maxLength"].as_u64();
        if schema["x-kubernetes-int-or-string"] == true {
            let max = max_length.map_or(MAX_REQUEST_SIZE - 2, |l| l * 4);
            return Some(Decl::simple(Kind::Dyn, max, 1));
        }
        let mut schema = schema.clone();
        if resource_root || schema["x-kubernetes-embedded-resource"] == true {
            with_type_and_object_meta(&mut schema);
        }
        match schema["type"].as_str()? {
            "array" => {
                let items = Decl::of(&schema["items"], false)?;
                let max = schema["maxItems"]
                    .as_u64()
                    .unwrap_or((MAX_REQUEST_SIZE - 2) / (items.min_serialized_size + 1));
                Some(Decl {
                    element: Some(Box::new(items)),
                    ..Decl::simple(Kind::List, max, 2)
                })
            }
            "object" => {
                if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                    let values = Decl::of(values, false)?;
                    let max = schema["maxProperties"]
                        .as_u64()
                        .unwrap_or((MAX_REQUEST_SIZE - 2) / (values.min_serialized_size + 6));
                    return Some(Decl {
                        element: Some(Box::new(values)),
                        ..Decl::simple(Kind::Map, max, 2)
                    });
                }
                let required: Vec<&str> = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let mut object = Decl::simple(Kind::Object, 0, 2);
                for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                    let Some(field) = Decl::of(property, false) else {
                        continue;
                    };
                    if required.contains(&name.as_str()) && property.get("default").is_none() {
                        object.min_serialized_size +=
                            name.len() as u64 + field.min_serialized_size + 4;
                    }
                    if let Some(escaped) = escape(name) {
                        object.fields.insert(escaped, field);
                    }
                }
                Some(object)
            }
            "string" => Some(match schema["format"].as_str() {
                Some("byte") => {
                    Decl::simple(Kind::Bytes, max_length.unwrap_or(MAX_REQUEST_SIZE - 2), 2)
                }
                Some("duration") => Decl::simple(Kind::Duration, 32, 3),
                Some("date") => Decl::simple(Kind::Timestamp, 12, 12),
                Some("date-time") => Decl::simple(Kind::Timestamp, 32, 21),
                _ => {
                    let longest_enum = schema["enum"].as_array().map(|values| {
                        values
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|v| v.len() as u64)
                            .max()
                            .unwrap_or(0)
                    });
                    let max = max_length
                        .map(|l| l * 4)
                        .or(longest_enum)
                        .unwrap_or(MAX_REQUEST_SIZE - 2);
                    Decl::simple(Kind::String, max, 2)
                }
            }),
            "boolean" => Some(Decl::simple(Kind::Bool, 0, 4)),
            "number" => Some(Decl::simple(Kind::Double, 0, 1)),
            "integer" => Some(Decl::simple(Kind::Int, 0, 1)),
            _ => None,
        }
    }
}

/// `apiVersion`, `kind`, `metadata.name` and `metadata.generateName` are always there at the root
/// of a resource, as strings without bounds.
fn with_type_and_object_meta(schema: &mut Value) {
    let string = serde_json::json!({"type": "string"});
    let properties = &mut schema["properties"];
    properties["kind"] = string.clone();
    properties["apiVersion"] = string.clone();
    properties["metadata"] = serde_json::json!({
        "type": "object",
        "properties": {"name": string, "generateName": string}
    });
}

/// A property's name in CEL, or `None` when it cannot be named there.
fn escape(name: &str) -> Option<String> {
    if RESERVED.contains(&name) {
        return Some(format!("__{name}__"));
    }
    let mut out = String::new();
    let mut chars = name.chars().peekable();
    let mut first = true;
    while let Some(c) = chars.next() {
        match c {
            '_' if chars.peek() == Some(&'_') => {
                chars.next();
                out.push_str("__underscores__");
            }
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            c if c.is_ascii_alphabetic() || c == '_' || (!first && c.is_ascii_digit()) => {
                out.push(c)
            }
            _ => return None,
        }
        first = false;
    }
    Some(out)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    pub min: u64,
    pub max: u64,
}

impl Estimate {
    const UNKNOWN: Estimate = Estimate {
        min: 0,
        max: u64::MAX,
    };

    fn fixed(v: u64) -> Self {
        Self { min: v, max: v }
    }

    fn add(self, other: Estimate) -> Self {
        Self {
            min: self.min.saturating_add(other.min),
            max: self.max.saturating_add(other.max),
        }
    }

    fn union(self, other: Estimate) -> Self {
        Self {
            min: self.min.min(other.min),
            max: self.max.max(other.max),
        }
    }

    fn times(self, other: Estimate) -> Self {
        Self {
            min: self.min.saturating_mul(other.min),
            max: self.max.saturating_mul(other.max),
        }
    }

    fn by_factor(self, factor: f64) -> Self {
        let scale = |v: u64| {
            let product = (v as f64 * factor).ceil();
            if product >= 18_446_744_073_709_551_616.0 {
                u64::MAX
            } else {
                product as u64
            }
        };
        Self {
            min: scale(self.min),
            max: scale(self.max),
        }
    }
}

/// What the checker knows of an expression: its type, where it comes from in `self`, and its
/// size when that is known.
#[derive(Clone, Debug)]
struct Node<'a> {
    kind: Kind,
    decl: Option<&'a Decl>,
    /// `self`, `spec`, `upgrade`, … (`@items` for a list's elements); none when it is not a path.
    path: Option<Vec<String>>,
    size: Option<Estimate>,
    /// A list literal's elements, as one of them.
    element: Option<Box<Node<'a>>>,
}

impl<'a> Node<'a> {
    fn of_kind(kind: Kind) -> Self {
        Self {
            kind,
            decl: None,
            path: None,
            size: None,
            element: None,
        }
    }

    fn sized(kind: Kind, size: Estimate) -> Self {
        Self {
            size: Some(size),
            ..Self::of_kind(kind)
        }
    }

    fn of_decl(decl: Option<&'a Decl>, path: Option<Vec<String>>) -> Self {
        Self {
            kind: decl.map_or(Kind::Dyn, |d| d.kind),
            decl,
            path,
            ..Self::of_kind(Kind::Dyn)
        }
    }

    fn child_path(&self, name: &str) -> Option<Vec<String>> {
        self.path.as_ref().map(|p| {
            let mut p = p.clone();
            p.push(name.to_owned());
            p
        })
    }

    /// The node of one element of this list (or key of this map), for an iteration variable.
    fn element(&self) -> Node<'a> {
        if let Some(element) = &self.element {
            return (**element).clone();
        }
        match self.decl {
            Some(d) if d.kind == Kind::Map => Node {
                path: self.child_path("@keys"),
                ..Node::of_kind(Kind::String)
            },
            Some(d) => Node::of_decl(d.element.as_deref(), self.child_path("@items")),
            None => Node::of_kind(Kind::Dyn),
        }
    }
}

struct Coster<'a> {
    root: &'a Decl,
    locals: Vec<(String, Node<'a>)>,
}

impl<'a> Coster<'a> {
    /// The CRD compiler's size estimator: follows the path from the rule's node by the names as
    /// written (it has no keyword fallback: `self.spec.import` is not found); `None` when a name
    /// is not a field.
    fn size_from_path(&self, path: &[String]) -> Option<Estimate> {
        let mut node = self.root;
        for name in path.iter().skip(1) {
            node = match name.as_str() {
                "@items" | "@values" => node.element.as_deref()?,
                "@keys" => return Some(Estimate::default()),
                field => node.fields.get(field)?,
            };
        }
        Some(Estimate {
            min: 0,
            max: node.max_elements,
        })
    }

    /// cel-go's `computeSize`: a known size, the size estimator's, or 1 for a scalar.
    fn size(&self, node: &Node<'a>) -> Option<Estimate> {
        if let Some(size) = node.size {
            return Some(size);
        }
        if let Some(path) = node.path.as_deref().filter(|p| !p.is_empty())
            && !path[0].starts_with('@')
            && let Some(size) = self.size_from_path(path)
        {
            return Some(size);
        }
        node.kind.is_scalar().then(|| Estimate::fixed(1))
    }

    fn size_or_unknown(&self, node: &Node<'a>) -> Estimate {
        self.size(node).unwrap_or(Estimate::UNKNOWN)
    }

    /// The type checker finds a reserved word's field by its escaped name (`import` as
    /// `__import__`), so the rule compiles; only the size estimator misses it.
    fn field(&self, operand: &Node<'a>, name: &str) -> Node<'a> {
        let decl = operand.decl.and_then(|d| match d.kind {
            Kind::Map => d.element.as_deref(),
            _ => d.fields.get(name).or_else(|| {
                RESERVED
                    .contains(&name)
                    .then(|| d.fields.get(&format!("__{name}__")))
                    .flatten()
            }),
        });
        Node::of_decl(decl, operand.child_path(name))
    }

    fn cost(&mut self, expr: &IdedExpr) -> Result<(Estimate, Node<'a>), String> {
        match &expr.expr {
            Expr::Literal(value) => {
                let (kind, size) = match value {
                    Val::String(s) => (Kind::String, s.chars().count() as u64),
                    Val::Bytes(b) => (Kind::Bytes, b.len() as u64),
                    Val::Boolean(_) => (Kind::Bool, 1),
                    Val::Int(_) | Val::UInt(_) => (Kind::Int, 1),
                    Val::Double(_) => (Kind::Double, 1),
                    Val::Null => (Kind::Null, 1),
                };
                Ok((
                    Estimate::default(),
                    Node::sized(kind, Estimate::fixed(size)),
                ))
            }
            Expr::Ident(name) => {
                if let Some((_, node)) = self.locals.iter().rev().find(|(n, _)| n == name) {
                    return Ok((Estimate::fixed(IDENT_OR_SELECT_COST), node.clone()));
                }
                match name.as_str() {
                    "self" | "oldSelf" => Ok((
                        Estimate::fixed(IDENT_OR_SELECT_COST),
                        Node::of_decl(Some(self.root), Some(vec![name.clone()])),
                    )),
                    other => Err(format!("unknown variable {other}")),
                }
            }
            Expr::Select(select) => {
                let (mut cost, operand) = self.cost(&select.operand)?;
                if select.test {
                    // has(): free in Kubernetes (PresenceTestHasCost(false)) but for its operand.
                    return Ok((cost, Node::of_kind(Kind::Bool)));
                }
                if matches!(operand.kind, Kind::Object | Kind::Map) {
                    cost = cost.add(Estimate::fixed(IDENT_OR_SELECT_COST));
                }
                Ok((cost, self.field(&operand, &select.field)))
            }
            Expr::List(list) => {
                let mut cost = Estimate::fixed(LIST_CREATE_COST);
                let mut element = None;
                for item in &list.elements {
                    let (item_cost, node) = self.cost(item)?;
                    cost = cost.add(item_cost);
                    element.get_or_insert(node);
                }
                let mut node = Node::sized(Kind::List, Estimate::fixed(list.elements.len() as u64));
                node.element = element.map(|e| Box::new(Node { path: None, ..e }));
                Ok((cost, node))
            }
            Expr::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args),
            Expr::Comprehension(comprehension) => self.comprehension(comprehension),
            other => Err(format!("no cost model for {other:?}")),
        }
    }

    fn call(
        &mut self,
        function: &str,
        target: Option<&IdedExpr>,
        args: &[IdedExpr],
    ) -> Result<(Estimate, Node<'a>), String> {
        let mut costs = Vec::new();
        let mut nodes = Vec::new();
        for arg in args {
            let (cost, node) = self.cost(arg)?;
            costs.push(cost);
            nodes.push(node);
        }
        let arg_sum = costs
            .iter()
            .fold(Estimate::default(), |sum, cost| sum.add(*cost));
        let (target_cost, target) = match target {
            Some(t) => {
                let (cost, node) = self.cost(t)?;
                (cost, Some(node))
            }
            None => (Estimate::default(), None),
        };
        let one = Estimate::fixed(1);
        let textual = |n: &Node| matches!(n.kind, Kind::String | Kind::Bytes);
        let (cost, node) = match (function, nodes.as_slice()) {
            ("_==_" | "_!=_", [lhs, rhs]) => {
                (self.comparison(lhs, rhs, arg_sum), Kind::Bool.into())
            }
            ("_<_" | "_<=_" | "_>_" | "_>=_", [lhs, rhs]) if textual(lhs) && textual(rhs) => {
                (self.comparison(lhs, rhs, arg_sum), Kind::Bool.into())
            }
            ("_<_" | "_<=_" | "_>_" | "_>=_", [_, _]) => (one.add(arg_sum), Kind::Bool.into()),
            ("_&&_" | "_||_", [_, _]) => (
                Estimate {
                    min: costs[0].min,
                    max: costs[0].add(costs[1]).max,
                },
                Kind::Bool.into(),
            ),
            ("_?_:_", [_, when_true, when_false]) => {
                let size = self
                    .size_or_unknown(when_true)
                    .union(self.size_or_unknown(when_false));
                (
                    costs[0].add(costs[1].union(costs[2])),
                    Node::sized(when_true.kind, size),
                )
            }
            ("!_" | "@not_strictly_false", [_]) => (one.add(arg_sum), Kind::Bool.into()),
            ("size", [_]) => (one.add(arg_sum), Kind::Int.into()),
            ("size", []) if target.is_some() => (one, Kind::Int.into()),
            ("_+_", [lhs, rhs]) if lhs.kind == Kind::List => {
                let size = self.size_or_unknown(lhs).add(self.size_or_unknown(rhs));
                (one.add(arg_sum), Node::sized(Kind::List, size))
            }
            ("_+_", [lhs, rhs]) if textual(lhs) => {
                let size = self.size_or_unknown(lhs).add(self.size_or_unknown(rhs));
                (
                    size.by_factor(STRING_TRAVERSAL_FACTOR).add(arg_sum),
                    Node::sized(lhs.kind, size),
                )
            }
            ("_+_" | "_-_" | "_*_" | "_/_" | "_%_", [lhs, _]) | ("-_", [lhs]) => {
                (one.add(arg_sum), lhs.kind.into())
            }
            ("_[_]", [container, _]) => {
                let element = match container.decl {
                    Some(d) if d.kind == Kind::Map => {
                        Node::of_decl(d.element.as_deref(), container.child_path("@values"))
                    }
                    _ => container.element(),
                };
                (one.add(arg_sum), element)
            }
            ("@in", [_, container]) => (
                self.size_or_unknown(container).add(arg_sum),
                Kind::Bool.into(),
            ),
            ("startsWith" | "endsWith", [prefix]) if target.is_some() => (
                self.size_or_unknown(prefix)
                    .by_factor(STRING_TRAVERSAL_FACTOR)
                    .add(arg_sum),
                Kind::Bool.into(),
            ),
            ("contains", [part]) if target.as_ref().is_some_and(textual) => {
                let text = target.as_ref().map(|t| self.size_or_unknown(t));
                let text = text.unwrap_or(Estimate::UNKNOWN);
                (
                    text.by_factor(STRING_TRAVERSAL_FACTOR)
                        .times(
                            self.size_or_unknown(part)
                                .by_factor(STRING_TRAVERSAL_FACTOR),
                        )
                        .add(arg_sum),
                    Kind::Bool.into(),
                )
            }
            ("matches", [pattern]) if target.is_some() => {
                let text = target.as_ref().map(|t| self.size_or_unknown(t));
                let text = text.unwrap_or(Estimate::UNKNOWN);
                (
                    text.add(one)
                        .by_factor(STRING_TRAVERSAL_FACTOR)
                        .times(self.size_or_unknown(pattern).by_factor(0.25))
                        .add(arg_sum),
                    Kind::Bool.into(),
                )
            }
            _ => return Err(format!("no cost model for the function {function}")),
        };
        Ok((target_cost.add(cost), node))
    }

    /// Equality and the comparison of strings: the smaller operand's size, a tenth of a unit
    /// each; nothing nested is looked at (an object's size is 0).
    fn comparison(&self, lhs: &Node<'a>, rhs: &Node<'a>, arg_sum: Estimate) -> Estimate {
        let smallest = self
            .size_or_unknown(lhs)
            .max
            .min(self.size_or_unknown(rhs).max);
        Estimate {
            min: u64::from(smallest > 0),
            max: smallest,
        }
        .by_factor(STRING_TRAVERSAL_FACTOR)
        .add(arg_sum)
    }

    fn comprehension(
        &mut self,
        comprehension: &ComprehensionExpr,
    ) -> Result<(Estimate, Node<'a>), String> {
        if comprehension.iter_var2.is_some() {
            return Err("no cost model for two-variable comprehensions".into());
        }
        let (range_cost, range) = self.cost(&comprehension.iter_range)?;
        let (init_cost, init) = self.cost(&comprehension.accu_init)?;
        self.locals.push((
            comprehension.accu_var.clone(),
            Node {
                path: None,
                ..init.clone()
            },
        ));
        self.locals
            .push((comprehension.iter_var.clone(), range.element()));
        let condition = self.cost(&comprehension.loop_cond);
        let step = self.cost(&comprehension.loop_step);
        self.locals.pop();
        let result = self.cost(&comprehension.result);
        self.locals.pop();
        let ((condition, _), (step, _), (result, _)) = (condition?, step?, result?);
        let count = self.size_or_unknown(&range);
        let node = match init.kind {
            Kind::List | Kind::Map => Node::sized(init.kind, count),
            kind => Node::sized(kind, init.size.unwrap_or(Estimate::fixed(1))),
        };
        Ok((
            range_cost
                .add(init_cost)
                .add(result)
                .add(count.times(step.add(condition))),
            node,
        ))
    }
}

impl From<Kind> for Node<'_> {
    fn from(kind: Kind) -> Self {
        Node::of_kind(kind)
    }
}

/// The API server's estimate of one rule on the schema node it is declared on (`resource_root`:
/// the CRD's `openAPIV3Schema`, where `apiVersion`, `kind` and `metadata.name` are added).
pub fn rule_cost(rule: &str, schema: &Value, resource_root: bool) -> Result<Estimate, String> {
    let decl = Decl::of(schema, resource_root)
        .ok_or_else(|| format!("the schema of rule {rule:?} is not visible to CEL"))?;
    let expr = cel_parser::Parser::new()
        .parse(rule)
        .map_err(|e| format!("{rule:?} does not parse: {e}"))?;
    let mut coster = Coster {
        root: &decl,
        locals: Vec::new(),
    };
    Ok(coster.cost(&expr)?.0)
}

/// One rule as the API server weighs it: its cost times how often it can run in one object.
#[derive(Clone, Debug)]
pub struct RuleCost {
    /// Where it is, as the API server names it (`…x-kubernetes-validations[1].rule`).
    pub path: String,
    pub rule: String,
    pub cost: u64,
    pub cardinality: u64,
    pub total: u64,
}

/// Every rule of a CRD's `openAPIV3Schema`, with its estimated cost.
pub fn crd_rule_costs(open_api_schema: &Value) -> Result<Vec<RuleCost>, String> {
    let mut out = Vec::new();
    walk(
        open_api_schema,
        "spec.validation.openAPIV3Schema",
        Some(1),
        true,
        &mut out,
    )?;
    Ok(out)
}

fn walk(
    schema: &Value,
    path: &str,
    cardinality: Option<u64>,
    resource_root: bool,
    out: &mut Vec<RuleCost>,
) -> Result<(), String> {
    for (i, rule) in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let text = rule["rule"].as_str().unwrap_or_default();
        let cost = rule_cost(text, schema, resource_root)?.max;
        let cardinality = cardinality.unwrap_or_else(|| {
            let min_size = Decl::of(schema, resource_root).map_or(0, |d| d.min_serialized_size);
            MAX_REQUEST_SIZE / (min_size + 1)
        });
        out.push(RuleCost {
            path: format!("{path}.x-kubernetes-validations[{i}].rule"),
            rule: text.to_owned(),
            cost,
            cardinality,
            total: if cost == 0 {
                0
            } else {
                cost.saturating_mul(cardinality)
            },
        });
    }
    // How many of each child one object can hold.
    let fan_out = |bound: &Value| bound.as_u64().and_then(|b| cardinality.map(|c| c * b));
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        walk(
            property,
            &format!("{path}.properties[{name}]"),
            cardinality,
            false,
            out,
        )?;
    }
    if schema["items"].is_object() {
        walk(
            &schema["items"],
            &format!("{path}.items"),
            fan_out(&schema["maxItems"]),
            false,
            out,
        )?;
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        walk(
            values,
            &format!("{path}.additionalProperties"),
            fan_out(&schema["maxProperties"]),
            false,
            out,
        )?;
    }
    Ok(())
}

/// The API server's verdict on a CRD's rules: its error messages, none when it accepts them.
pub fn server_verdict(costs: &[RuleCost]) -> Vec<String> {
    let mut errors: Vec<String> = costs
        .iter()
        .filter(|c| c.total > PER_RULE_LIMIT)
        .map(|c| {
            format!(
                "{}: Forbidden: {}",
                c.path,
                over_budget("estimated rule cost", c.total, PER_RULE_LIMIT)
            )
        })
        .collect();
    let total = costs
        .iter()
        .fold(0u64, |sum, c| sum.saturating_add(c.total));
    if total > PER_CRD_LIMIT {
        errors.push(format!(
            "spec.validation.openAPIV3Schema: Forbidden: {}",
            over_budget(
                "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema",
                total,
                PER_CRD_LIMIT
            )
        ));
    }
    errors
}

fn over_budget(what: &str, cost: u64, limit: u64) -> String {
    let factor = cost as f64 / limit as f64;
    let factor = if factor > 100.0 {
        "more than 100x".to_owned()
    } else if factor < 1.5 {
        format!("{factor:.6}x")
    } else {
        format!("{factor:.1}x")
    };
    format!(
        "{what} exceeds budget by factor of {factor} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
}
