//! What the benchmark report and the demo summary are made of: `redis-benchmark --csv` rows read
//! by column name, and tables that put each goal next to the measured value.

/// One `redis-benchmark --csv` row (redis-benchmark 7: `"test","rps","avg_latency_ms",...`).
#[derive(Clone, Debug, PartialEq)]
pub struct BenchmarkRow {
    /// The test name (`SET`, `GET`, `INCR`, ...).
    pub test: String,
    /// Requests per second.
    pub rps: f64,
    /// Mean latency, ms.
    pub avg_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Largest latency, ms.
    pub max_ms: f64,
}

/// The rows of `redis-benchmark --csv` output; columns are found by their header names, so a
/// column order change cannot silently swap figures. Rows that do not parse are skipped.
pub fn parse_redis_benchmark_csv(csv: &str) -> Vec<BenchmarkRow> {
    let split =
        |line: &str| -> Vec<String> { line.split(',').map(|f| f.trim().trim_matches('"').to_string()).collect() };
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next().map(split) else { return Vec::new() };
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(test), Some(rps), Some(avg), Some(p50), Some(p99), Some(max)) = (
        col("test"),
        col("rps"),
        col("avg_latency_ms"),
        col("p50_latency_ms"),
        col("p99_latency_ms"),
        col("max_latency_ms"),
    ) else {
        return Vec::new();
    };
    lines
        .filter_map(|line| {
            let f = split(line);
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
            Some(BenchmarkRow {
                test: f.get(test)?.clone(),
                rps: num(rps)?,
                avg_ms: num(avg)?,
                p50_ms: num(p50)?,
                p99_ms: num(p99)?,
                max_ms: num(max)?,
            })
        })
        .collect()
}

/// Whether a goal was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The measured value meets the goal.
    Met,
    /// It does not; the row's note says what bounds it.
    Missed,
    /// Not measured in this run; the note says why.
    NotMeasured,
}

/// One row of a goals table.
#[derive(Clone, Debug)]
pub struct GoalRow {
    /// Short id (`P1`, `S2`, ...).
    pub id: String,
    /// What is measured.
    pub measure: String,
    /// The goal, as text.
    pub goal: String,
    /// The measured value, as text.
    pub measured: String,
    /// Met or not.
    pub verdict: Verdict,
    /// What bounds a missed goal, or how it was measured.
    pub note: String,
}

impl GoalRow {
    /// A row judged by `met`.
    pub fn judged(id: &str, measure: &str, goal: &str, measured: String, met: bool, note: &str) -> Self {
        Self {
            id: id.into(),
            measure: measure.into(),
            goal: goal.into(),
            measured,
            verdict: if met { Verdict::Met } else { Verdict::Missed },
            note: note.into(),
        }
    }
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// A markdown table of goal rows.
pub fn goal_table(rows: &[GoalRow]) -> String {
    let mut out = String::from("| id | measure | goal | measured | met? | notes |\n|---|---|---|---|---|---|\n");
    for r in rows {
        let verdict = match r.verdict {
            Verdict::Met => "yes",
            Verdict::Missed => "**no**",
            Verdict::NotMeasured => "not measured",
        };
        out += &format!(
            "| {} | {} | {} | {} | {verdict} | {} |\n",
            cell(&r.id),
            cell(&r.measure),
            cell(&r.goal),
            cell(&r.measured),
            cell(&r.note)
        );
    }
    out
}

/// The `q`-quantile (0..=1) of `values` (sorted or not); `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    Some(v[rank])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
\"SET\",\"3184.71\",\"6.110\",\"0.800\",\"5.399\",\"10.239\",\"15.007\",\"30.111\"\n\
\"GET\",\"2847.00\",\"7.000\",\"0.900\",\"6.900\",\"12.000\",\"16.300\",\"40.000\"\n";

    #[test]
    fn csv_rows_by_column_name() {
        let rows = parse_redis_benchmark_csv(CSV);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].test, "SET");
        assert_eq!((rows[0].rps, rows[0].p50_ms, rows[0].p99_ms, rows[0].max_ms), (3184.71, 5.399, 15.007, 30.111));
        assert_eq!(rows[1].avg_ms, 7.0);
        assert!(parse_redis_benchmark_csv("no header here\n1,2,3").is_empty());
        assert!(parse_redis_benchmark_csv("").is_empty());
    }

    #[test]
    fn goal_table_marks_misses() {
        let rows = [
            GoalRow::judged("P2", "p50 ratio", "≤1.3", "1.10".into(), true, ""),
            GoalRow::judged("P4", "throughput | ratio", "≥0.8", "0.50".into(), false, "bound by the link"),
        ];
        let t = goal_table(&rows);
        assert!(t.contains("| P2 | p50 ratio | ≤1.3 | 1.10 | yes |"));
        assert!(t.contains("| **no** | bound by the link |"));
        assert!(t.contains("throughput \\| ratio"), "pipes are escaped");
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 1.0), Some(3.0));
        assert_eq!(quantile(&[5.0, f64::NAN], 0.0), Some(5.0));
    }
}
