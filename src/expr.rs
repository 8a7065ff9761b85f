//! `when:` conditions on pipeline steps, e.g. `steps.classify.category == "billing"`.
//!
//! A condition is parsed once at config load, so mistakes are reported then with the
//! character position where they were found, and evaluated per job. Evaluation never
//! fails: an absent value is null, and an ordering between values that are not both
//! numbers or both strings is false (so `not (a < b)` is true for such values).

use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

/// Longest condition accepted, in characters.
const MAX_LEN: usize = 2000;
/// Deepest nesting of `(` and `not` accepted; keeps parsing and evaluation off the stack limit.
const MAX_DEPTH: usize = 32;

/// Where a path starts: the job input, or the record of an earlier step.
#[derive(Debug, Clone, PartialEq)]
pub enum Root {
    Input,
    Step(String),
}

/// A value read by a condition: `steps.score.output.score` is `Step("score")` with fields
/// `["output", "score"]`; `input.priority` is `Input` with `["priority"]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub root: Root,
    pub fields: Vec<String>,
}

impl Path {
    /// Walks `fields` down from `value` (the input, or the step's record); an all-digit
    /// field indexes an array. None when any field is absent.
    pub fn select<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        self.fields.iter().try_fold(value, |v, f| match v {
            Value::Array(items) => items.get(f.parse::<usize>().ok()?),
            _ => v.get(f.as_str()),
        })
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.root {
            Root::Input => f.write_str("input")?,
            Root::Step(name) => write!(f, "steps.{name}")?,
        }
        self.fields.iter().try_for_each(|x| write!(f, ".{x}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Contains,
}

#[derive(Debug, Clone)]
enum Operand {
    Path(Path),
    /// A literal; a list literal is a `Value::Array`.
    Lit(Value),
}

#[derive(Debug, Clone)]
enum Node {
    Or(Vec<Node>),
    And(Vec<Node>),
    Not(Box<Node>),
    Truthy(Operand),
    Cmp(Operand, Op, Operand),
}

/// A compiled `when:` condition.
#[derive(Debug, Clone)]
pub struct Expr {
    root: Node,
}

impl Expr {
    /// Parse error says what was expected and at which character position (0-based),
    /// e.g. "expected a value after `==` at position 27".
    pub fn parse(text: &str) -> Result<Expr, String> {
        let chars: Vec<char> = text.chars().collect();
        if chars.len() > MAX_LEN {
            return Err(format!(
                "condition is {} characters long; the limit is {MAX_LEN}",
                chars.len()
            ));
        }
        let mut p = Parser {
            toks: lex(&chars)?,
            i: 0,
            end: chars.len(),
            depth: 0,
        };
        let root = p.or()?;
        match p.toks.get(p.i) {
            Some(t) => Err(format!(
                "unexpected `{}` at position {}; expected `and`, `or` or the end of the condition",
                t.text, t.pos
            )),
            None => Ok(Expr { root }),
        }
    }

    /// Every path the expression reads, in source order (duplicates kept).
    pub fn paths(&self) -> Vec<&Path> {
        fn walk<'a>(n: &'a Node, out: &mut Vec<&'a Path>) {
            let operand = |o: &'a Operand, out: &mut Vec<&'a Path>| {
                if let Operand::Path(p) = o {
                    out.push(p);
                }
            };
            match n {
                Node::Or(v) | Node::And(v) => v.iter().for_each(|n| walk(n, out)),
                Node::Not(n) => walk(n, out),
                Node::Truthy(o) => operand(o, out),
                Node::Cmp(l, _, r) => {
                    operand(l, out);
                    operand(r, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// `lookup` returns the value at a path, None when absent (absent behaves as null).
    pub fn eval(&self, lookup: &dyn Fn(&Path) -> Option<Value>) -> bool {
        eval_node(&self.root, lookup)
    }
}

fn eval_node(n: &Node, lookup: &dyn Fn(&Path) -> Option<Value>) -> bool {
    match n {
        Node::Or(v) => v.iter().any(|n| eval_node(n, lookup)),
        Node::And(v) => v.iter().all(|n| eval_node(n, lookup)),
        Node::Not(n) => !eval_node(n, lookup),
        Node::Truthy(o) => truthy(&value(o, lookup)),
        Node::Cmp(l, op, r) => compare(&value(l, lookup), *op, &value(r, lookup)),
    }
}

fn value<'a>(o: &'a Operand, lookup: &dyn Fn(&Path) -> Option<Value>) -> Cow<'a, Value> {
    match o {
        Operand::Path(p) => Cow::Owned(lookup(p).unwrap_or(Value::Null)),
        Operand::Lit(v) => Cow::Borrowed(v),
    }
}

fn compare(l: &Value, op: Op, r: &Value) -> bool {
    let substr = |hay: &str, needle: &Value| needle.as_str().is_some_and(|n| hay.contains(n));
    match op {
        Op::Eq => equal(l, r),
        Op::Ne => !equal(l, r),
        Op::Lt => order(l, r).is_some_and(Ordering::is_lt),
        Op::Le => order(l, r).is_some_and(Ordering::is_le),
        Op::Gt => order(l, r).is_some_and(Ordering::is_gt),
        Op::Ge => order(l, r).is_some_and(Ordering::is_ge),
        Op::In => match r {
            Value::Array(items) => items.iter().any(|x| equal(l, x)),
            Value::String(s) => substr(s, l),
            _ => false,
        },
        Op::Contains => match l {
            Value::Array(items) => items.iter().any(|x| equal(x, r)),
            Value::String(s) => substr(s, r),
            _ => false,
        },
    }
}

/// JSON equality, except that numbers compare as f64 (`1 == 1.0`), also inside arrays and objects.
fn equal(l: &Value, r: &Value) -> bool {
    match (l, r) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| equal(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => l == r,
    }
}

/// Numbers numerically, strings lexicographically; None for any other pair.
fn order(l: &Value, r: &Value) -> Option<Ordering> {
    match (l, r) {
        (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// null, false, 0, "", [] and {} are false; everything else is true.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// One of `( ) [ ] ,`.
    Sym(char),
    And,
    Or,
    Not,
    Op(Op),
    Lit(Value),
    Path(Path),
}

struct Token {
    tok: Tok,
    pos: usize,
    text: String,
}

fn lex(chars: &[char]) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let (tok, end) = match (c, next) {
            ('(' | ')' | '[' | ']' | ',', _) => (Tok::Sym(c), i + 1),
            ('=', Some('=')) => (Tok::Op(Op::Eq), i + 2),
            ('!', Some('=')) => (Tok::Op(Op::Ne), i + 2),
            ('<', Some('=')) => (Tok::Op(Op::Le), i + 2),
            ('>', Some('=')) => (Tok::Op(Op::Ge), i + 2),
            ('<', _) => (Tok::Op(Op::Lt), i + 1),
            ('>', _) => (Tok::Op(Op::Gt), i + 1),
            ('!', _) => (Tok::Not, i + 1),
            ('&', Some('&')) => (Tok::And, i + 2),
            ('|', Some('|')) => (Tok::Or, i + 2),
            ('"' | '\'', _) => lex_string(chars, i)?,
            ('-', Some(d)) if d.is_ascii_digit() => lex_number(chars, i)?,
            (d, _) if d.is_ascii_digit() => lex_number(chars, i)?,
            (a, _) if a.is_ascii_alphabetic() || a == '_' => lex_word(chars, i)?,
            ('=', _) => return Err(format!("unexpected `=` at position {i}; compare with `==`")),
            _ => return Err(format!("unexpected character `{c}` at position {i}")),
        };
        let text = chars.iter().skip(i).take(end - i).collect();
        out.push(Token { tok, pos: i, text });
        i = end;
    }
    Ok(out)
}

fn lex_string(chars: &[char], start: usize) -> Result<(Tok, usize), String> {
    let quote = chars.get(start).copied();
    let mut s = String::new();
    let mut j = start + 1;
    loop {
        match chars.get(j).copied() {
            None => return Err(format!("unterminated string starting at position {start}")),
            Some('\\') => {
                s.push(match chars.get(j + 1).copied() {
                    Some(c @ ('"' | '\'' | '\\')) => c,
                    Some('n') => '\n',
                    Some('t') => '\t',
                    _ => {
                        return Err(format!(
                            "unknown escape at position {j}; use \\\" \\' \\\\ \\n or \\t"
                        ))
                    }
                });
                j += 2;
            }
            Some(c) if Some(c) == quote => return Ok((Tok::Lit(Value::String(s)), j + 1)),
            Some(c) => {
                s.push(c);
                j += 1;
            }
        }
    }
}

/// The chars from `start` while `keep` holds, and the index after them.
fn run(chars: &[char], start: usize, keep: fn(&char) -> bool) -> (String, usize) {
    let len = chars
        .get(start..)
        .map_or(0, |r| r.iter().take_while(|c| keep(c)).count());
    (chars.iter().skip(start).take(len).collect(), start + len)
}

fn lex_number(chars: &[char], start: usize) -> Result<(Tok, usize), String> {
    // The longest run that could belong to a number (after a leading `-`); serde_json
    // decides whether it is one.
    let minus = usize::from(chars.get(start) == Some(&'-'));
    let (_, end) = run(chars, start + minus, |c| {
        c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')
    });
    let text: String = chars.iter().skip(start).take(end - start).collect();
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Number(_)) => Ok((Tok::Lit(v), end)),
        _ => Err(format!("invalid number `{text}` at position {start}")),
    }
}

fn is_ident(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
}

fn lex_word(chars: &[char], start: usize) -> Result<(Tok, usize), String> {
    let (word, end) = run(chars, start, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
    });
    let keyword = match word.as_str() {
        "and" => Tok::And,
        "or" => Tok::Or,
        "not" => Tok::Not,
        "in" => Tok::Op(Op::In),
        "contains" => Tok::Op(Op::Contains),
        "true" => Tok::Lit(Value::Bool(true)),
        "false" => Tok::Lit(Value::Bool(false)),
        "null" => Tok::Lit(Value::Null),
        _ => return lex_path(&word, start).map(|path| (Tok::Path(path), end)),
    };
    Ok((keyword, end))
}

/// `word` is ASCII, so byte offsets in it are character offsets.
fn lex_path(word: &str, start: usize) -> Result<Path, String> {
    let segs: Vec<&str> = word.split('.').collect();
    let (root, fields) = match segs.as_slice() {
        ["input", fields @ ..] => (Root::Input, fields),
        ["steps", name, fields @ ..] if is_ident(name) => (Root::Step(name.to_string()), fields),
        ["steps", ..] => {
            return Err(format!(
                "`steps` at position {start} needs a step name and a field, e.g. `steps.classify.category`"
            ))
        }
        _ => {
            let name = segs.first().unwrap_or(&word);
            return Err(format!(
                "unknown name `{name}` at position {start}; paths start with `input.` or `steps.`"
            ));
        }
    };
    let mut pos = start + word.len() - fields.iter().map(|f| f.len() + 1).sum::<usize>();
    for f in fields {
        pos += 1;
        if f.is_empty() {
            return Err(format!("expected a field name at position {pos}"));
        }
        if !is_ident(f) && !f.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("invalid field name `{f}` at position {pos}"));
        }
        pos += f.len();
    }
    if fields.is_empty() {
        let eg = match &root {
            Root::Input => "input.priority".to_string(),
            Root::Step(name) => format!("steps.{name}.category"),
        };
        return Err(format!(
            "`{word}` at position {start} needs a field, e.g. `{eg}`"
        ));
    }
    let fields = fields.iter().map(|f| f.to_string()).collect();
    Ok(Path { root, fields })
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    end: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.toks.get(self.i).map_or(self.end, |t| t.pos)
    }

    /// "expected {what} after `{previous token}` at position {p}, found `{token}`".
    fn expected(&self, what: &str) -> String {
        let after = match self.i.checked_sub(1).and_then(|k| self.toks.get(k)) {
            Some(t) => format!(" after `{}`", t.text),
            None => String::new(),
        };
        let found = match self.toks.get(self.i) {
            Some(t) => format!(", found `{}`", t.text),
            None => String::new(),
        };
        format!("expected {what}{after} at position {}{found}", self.pos())
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "condition nests deeper than {MAX_DEPTH} levels at position {}",
                self.pos()
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Node, String> {
        self.chain(&Tok::Or, Self::and, Node::Or)
    }

    fn and(&mut self) -> Result<Node, String> {
        self.chain(&Tok::And, Self::unary, Node::And)
    }

    /// `next (sep next)*`, wrapped only when there is more than one.
    fn chain(
        &mut self,
        sep: &Tok,
        next: fn(&mut Self) -> Result<Node, String>,
        wrap: fn(Vec<Node>) -> Node,
    ) -> Result<Node, String> {
        let mut items = vec![next(self)?];
        while self.peek() == Some(sep) {
            self.i += 1;
            items.push(next(self)?);
        }
        Ok(match <[Node; 1]>::try_from(items) {
            Ok([one]) => one,
            Err(items) => wrap(items),
        })
    }

    fn unary(&mut self) -> Result<Node, String> {
        if self.peek() != Some(&Tok::Not) {
            return self.primary();
        }
        self.i += 1;
        self.enter()?;
        let inner = self.unary()?;
        self.depth -= 1;
        Ok(Node::Not(Box::new(inner)))
    }

    fn primary(&mut self) -> Result<Node, String> {
        if self.peek() == Some(&Tok::Sym('(')) {
            let open = self.pos();
            self.i += 1;
            self.enter()?;
            let inner = self.or()?;
            if self.peek() != Some(&Tok::Sym(')')) {
                return Err(self.expected(&format!("`)` to close the `(` at position {open}")));
            }
            self.i += 1;
            self.depth -= 1;
            return Ok(inner);
        }
        let left = self.operand("a condition", false)?;
        let op = match self.peek() {
            Some(Tok::Op(op)) => *op,
            _ => return Ok(Node::Truthy(left)),
        };
        self.i += 1;
        let right = match op {
            Op::In => self.operand("a list `[...]` or a path", true)?,
            _ => self.operand("a value", false)?,
        };
        Ok(Node::Cmp(left, op, right))
    }

    /// A path or literal; after `in`, a list literal or a path only.
    fn operand(&mut self, what: &str, after_in: bool) -> Result<Operand, String> {
        let operand = match (self.peek(), after_in) {
            (Some(Tok::Path(p)), _) => Operand::Path(p.clone()),
            (Some(Tok::Lit(v)), false) => Operand::Lit(v.clone()),
            (Some(Tok::Sym('[')), true) => return self.list(),
            (Some(Tok::Sym('[')), false) => {
                return Err(format!(
                    "a list `[...]` at position {} may only follow `in`",
                    self.pos()
                ))
            }
            _ => return Err(self.expected(what)),
        };
        self.i += 1;
        Ok(operand)
    }

    fn list(&mut self) -> Result<Operand, String> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            match self.peek() {
                Some(Tok::Sym(']')) => break,
                Some(Tok::Lit(v)) => items.push(v.clone()),
                _ => return Err(self.expected("a literal or `]`")),
            }
            self.i += 1;
            match self.peek() {
                Some(Tok::Sym(',')) => self.i += 1,
                Some(Tok::Sym(']')) => break,
                _ => return Err(self.expected("`,` or `]`")),
            }
        }
        self.i += 1;
        Ok(Operand::Lit(Value::Array(items)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(text: &str) -> bool {
        let d = json!({
            "input": {"priority": "high", "n": 1, "f": 0.5, "tags": ["a", "b"], "text": "hello world",
                      "zero": 0, "empty": "", "list": [], "obj": {}, "t": true},
            "steps": {"classify": {"category": "billing"}, "triage": {"review": false},
                      "score": {"output": {"score": 0.6, "items": [{"id": 7}]}}}
        });
        let lookup = |p: &Path| match &p.root {
            Root::Input => p.select(d.get("input")?).cloned(),
            Root::Step(s) => p.select(d.get("steps")?.get(s)?).cloned(),
        };
        let e = Expr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        e.eval(&lookup)
    }

    const TRUE: &[&str] = &[
        // The brief's examples, literals and escapes.
        r#"steps.classify.category == "billing""#,
        "steps.score.output.score < 0.7",
        r#"not steps.triage.review and input.priority in ["high", "urgent"]"#,
        "steps.score.output.items.0.id == 7",
        r#"'it\'s' == "it's""#,
        r#""a\"b\\c\n" contains "\"b\\""#,
        "-1.5e1 == -15 and 1 == 1.0 and 1e2 == 100 and   input.t   ==true",
        // Precedence: `a or b and c` is `a or (b and c)`; `not` binds tighter than `or`.
        "true or false and false",
        "false and false or true",
        "not (true and false)",
        "!false && (false || true)",
        "not not true and ((((input.t))))",
        // Comparisons.
        "input.n == 1 and input.n != 2 and input.n <= 1 and input.n >= 1 and input.n > 0.5",
        r#""abc" < "abd" and input.priority >= "high" and input.tags == input.tags"#,
        r#"not (input.n < "2") and input.n != "1""#,
        // `in` and `contains`.
        r#"input.n in [0, 1.0, 2] and input.priority in ["low", "high",] and null in [null]"#,
        r#""a" in input.tags and "lo w" in input.text"#,
        r#"input.tags contains "b" and input.text contains "world""#,
        "steps.score.output.items contains steps.score.output.items.0",
        // Truthiness and absent values.
        "input.priority and input.tags and input.f and steps.score.output",
        "input.missing == null and not steps.nope.field and not input.t.deeper",
    ];

    const FALSE: &[&str] = &[
        "false",
        "null",
        "(true or false) and false",
        "not true or false",
        "!!!true",
        "input.n != 1.0",
        "input.n > 1 or input.n < 1",
        r#"input.n < "2" or input.n >= "0" or input.n == "1""#,
        "input.missing < 1 or input.missing > 1 or true > false",
        "input.n in [2, 3] or input.n in []",
        r#""c" in input.tags or 1 in input.text or "a" in input.missing"#,
        r#"input.tags contains "z" or input.text contains 1"#,
        r#"input.n contains "1" or input.missing contains "x""#,
        "input.zero or input.empty or input.list or input.obj or input.missing",
        "steps.score.output.items.9.id == 7",
    ];

    #[test]
    fn evaluates() {
        TRUE.iter().for_each(|t| assert!(check(t), "{t}"));
        FALSE.iter().for_each(|t| assert!(!check(t), "{t}"));
    }

    #[test]
    fn paths_and_display() {
        let e =
            Expr::parse("steps.score.output.score < 0.7 or input.p in steps.x.allowed").unwrap();
        let ps = e.paths();
        assert_eq!(ps[0].root, Root::Step("score".into()));
        assert_eq!(ps[0].fields, ["output", "score"]);
        assert_eq!(
            ps[1],
            &Path {
                root: Root::Input,
                fields: vec!["p".into()]
            }
        );
        let shown: Vec<String> = ps.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            shown,
            ["steps.score.output.score", "input.p", "steps.x.allowed"]
        );
        let e = Expr::parse("not steps.my-step_2.output.items.0.id").unwrap();
        assert_eq!(e.paths()[0].fields, ["output", "items", "0", "id"]);
        assert!(Expr::parse("true").unwrap().paths().is_empty());
    }

    #[test]
    fn short_circuits() {
        let e = Expr::parse("input.a or steps.x.y and steps.z.w").unwrap();
        let seen = std::cell::RefCell::new(Vec::new());
        let f = |p: &Path| {
            seen.borrow_mut().push(p.to_string());
            Some(json!(true))
        };
        assert!(e.eval(&f));
        assert_eq!(*seen.borrow(), ["input.a"]);
    }

    const ERRORS: &[(&str, &str)] = &[
        (
            "steps.classify.category == ",
            "expected a value after `==` at position 27",
        ),
        (
            "input.a == )",
            "expected a value after `==` at position 11, found `)`",
        ),
        ("'é' == ", "expected a value after `==` at position 7"), // chars, not bytes
        ("", "expected a condition at position 0"),
        (
            "input.a and",
            "expected a condition after `and` at position 11",
        ),
        (
            "steps.classify == 1",
            "`steps.classify` at position 0 needs a field, e.g. `steps.classify.category`",
        ),
        (
            "steps",
            "`steps` at position 0 needs a step name and a field",
        ),
        (
            "input",
            "`input` at position 0 needs a field, e.g. `input.priority`",
        ),
        (
            "true and foo.bar",
            "unknown name `foo` at position 9; paths start with `input.` or `steps.`",
        ),
        ("AND", "unknown name `AND` at position 0"),
        (
            "input.a == 1 input.b",
            "unexpected `input.b` at position 13; expected `and`, `or` or the end of the condition",
        ),
        (
            "(input.a",
            "expected `)` to close the `(` at position 0 after `input.a` at position 8",
        ),
        (
            "input.a in 3",
            "expected a list `[...]` or a path after `in` at position 11, found `3`",
        ),
        (
            "[1] == input.a",
            "a list `[...]` at position 0 may only follow `in`",
        ),
        (
            "input.a in [input.b]",
            "expected a literal or `]` after `[` at position 12",
        ),
        (
            "input.a in [1 2]",
            "expected `,` or `]` after `1` at position 14, found `2`",
        ),
        (
            "input.a = 1",
            "unexpected `=` at position 8; compare with `==`",
        ),
        (
            "input.a == 'x",
            "unterminated string starting at position 11",
        ),
        (r#"input.a == "\q""#, "unknown escape at position 12"),
        ("input..a", "expected a field name at position 6"),
        ("input.a.1x", "invalid field name `1x` at position 8"),
        ("input.a == 007", "invalid number `007` at position 11"),
        ("input.a > 1-2", "invalid number `1-2` at position 10"),
        ("input.a # 1", "unexpected character `#` at position 8"),
        (
            "input.a & input.b",
            "unexpected character `&` at position 8",
        ),
    ];

    #[test]
    fn parse_errors_carry_positions() {
        for (text, want) in ERRORS {
            let got = Expr::parse(text).err().unwrap_or_default();
            assert!(got.starts_with(want), "{text}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn bounds() {
        let nest = |n| format!("{}true{}", "(".repeat(n), ")".repeat(n));
        assert!(Expr::parse(&nest(MAX_DEPTH)).is_ok());
        for deep in [nest(MAX_DEPTH + 1), "not ".repeat(400), "!".repeat(1500)] {
            assert!(Expr::parse(&deep).is_err_and(|e| e.contains("deeper than 32 levels")));
        }
        let long = "true or ".repeat(300);
        assert!(Expr::parse(&long).is_err_and(|e| e.contains("the limit is 2000")));
        // Long flat chains are iterative, not nested.
        assert!(check(
            &["false"; 200].join(" or ").replacen("false", "true", 1)
        ));
    }
}
