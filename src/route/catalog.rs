//! Which functions a statement may call and still be sent to a subscriber.
//!
//! A read may run on a subscriber only if every function it calls is known
//! to be non-volatile (`provolatile` 'i' immutable or 's' stable). Volatile
//! functions (`nextval`, `random`, `pg_advisory_lock`, ...) and functions the
//! catalog does not know go to the primary.

use std::collections::HashMap;

/// Which functions are safe in a read routed to a subscriber: known
/// non-volatile ones.
///
/// Built either from a static list ([`FunctionCatalog::builtin`]) or from a
/// node's `pg_proc` ([`FunctionCatalog::from_rows`] with the rows of
/// [`FunctionCatalog::LOAD_SQL`]). Names are compared exactly as the parser
/// produces them (unquoted identifiers are already lowercased).
#[derive(Debug, Clone, Default)]
pub struct FunctionCatalog {
    /// Function name -> per-schema safety (`true`: every overload in that
    /// schema is immutable or stable).
    names: HashMap<String, HashMap<String, bool>>,
}

/// Names that are never safe on a subscriber, whatever `pg_proc` says:
/// sequence manipulation, locks, large objects, transaction ids, settings,
/// notifications and remote calls.
fn always_unsafe(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "nextval",
        "setval",
        "currval",
        "lastval",
        "loread",
        "lowrite",
        "txid_current",
        "txid_current_if_assigned",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "set_config",
        "pg_notify",
    ];
    const PREFIXES: &[&str] = &[
        "pg_advisory_",
        "pg_try_advisory_",
        "lo_",
        "dblink",
        "pg_sleep",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The built-in window functions (immutable; every one of them depends on
/// the order of the rows in its window).
pub const WINDOW_FUNCTIONS: &[&str] = &[
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
];

/// Common pg_catalog functions and aggregates known to be immutable or
/// stable (besides the [`WINDOW_FUNCTIONS`]).
const BUILTIN_SAFE: &[&str] = &[
    // aggregates
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "string_agg",
    "array_agg",
    "json_agg",
    "json_agg_strict",
    "jsonb_agg",
    "jsonb_agg_strict",
    "json_object_agg",
    "json_object_agg_strict",
    "json_object_agg_unique",
    "json_object_agg_unique_strict",
    "jsonb_object_agg",
    "jsonb_object_agg_strict",
    "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "any_value",
    "xmlagg",
    "range_agg",
    "range_intersect_agg",
    // strings
    "lower",
    "upper",
    "initcap",
    "casefold",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "left",
    "right",
    "lpad",
    "rpad",
    "ltrim",
    "rtrim",
    "btrim",
    "replace",
    "translate",
    "repeat",
    "reverse",
    "split_part",
    "strpos",
    "position",
    "overlay",
    "starts_with",
    "concat",
    "concat_ws",
    "format",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "md5",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "encode",
    "decode",
    "ascii",
    "chr",
    "to_hex",
    "to_ascii",
    "convert",
    "convert_from",
    "convert_to",
    "unistr",
    "normalize",
    "is_normalized",
    "like_escape",
    "similar_to_escape",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "string_to_array",
    "string_to_table",
    "array_to_string",
    "parse_ident",
    "pg_collation_for",
    // numbers
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "sign",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "power",
    "pow",
    "mod",
    "div",
    "pi",
    "degrees",
    "radians",
    "sin",
    "cos",
    "tan",
    "cot",
    "asin",
    "acos",
    "atan",
    "atan2",
    "sind",
    "cosd",
    "tand",
    "sinh",
    "cosh",
    "tanh",
    "gcd",
    "lcm",
    "factorial",
    "width_bucket",
    "scale",
    "min_scale",
    "trim_scale",
    // date and time (stable ones are fine: they read, they do not write)
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "date_trunc",
    "date_part",
    "date_bin",
    "extract",
    "age",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "isfinite",
    "timezone",
    "overlaps",
    "date_add",
    "date_subtract",
    // json and jsonb
    "to_json",
    "to_jsonb",
    "row_to_json",
    "array_to_json",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "json_object",
    "jsonb_object",
    "json_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_array_length",
    "jsonb_array_length",
    "json_array_elements",
    "jsonb_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements_text",
    "json_each",
    "jsonb_each",
    "json_each_text",
    "jsonb_each_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_typeof",
    "jsonb_typeof",
    "json_strip_nulls",
    "jsonb_strip_nulls",
    "json_populate_record",
    "jsonb_populate_record",
    "json_populate_recordset",
    "jsonb_populate_recordset",
    "json_to_record",
    "jsonb_to_record",
    "json_to_recordset",
    "jsonb_to_recordset",
    "jsonb_set",
    "jsonb_set_lax",
    "jsonb_insert",
    "jsonb_pretty",
    "jsonb_path_exists",
    "jsonb_path_match",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    // arrays and sets
    "array_length",
    "array_lower",
    "array_upper",
    "array_dims",
    "array_ndims",
    "cardinality",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_position",
    "array_positions",
    "array_remove",
    "array_replace",
    "array_fill",
    "array_reverse",
    "array_sort",
    "trim_array",
    "unnest",
    "generate_series",
    "generate_subscripts",
    "num_nulls",
    "num_nonnulls",
    // casts written as calls
    "int2",
    "int4",
    "int8",
    "float4",
    "float8",
    "numeric",
    "text",
    "varchar",
    "bpchar",
    "bool",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    // network
    "host",
    "hostmask",
    "masklen",
    "netmask",
    "network",
    "family",
    "broadcast",
    "abbrev",
    "set_masklen",
    "inet_same_family",
    "inet_merge",
    // system information
    "version",
    "current_setting",
    "current_database",
    "current_schema",
    "current_schemas",
    "system_user",
    "pg_backend_pid",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "pg_typeof",
    "pg_column_size",
    "pg_size_pretty",
    "pg_size_bytes",
    "pg_encoding_to_char",
    "pg_char_to_encoding",
    "pg_get_userbyid",
    "pg_get_viewdef",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "pg_get_triggerdef",
    "pg_get_functiondef",
    "pg_get_function_arguments",
    "pg_get_function_result",
    "pg_get_function_identity_arguments",
    "pg_get_expr",
    "pg_get_serial_sequence",
    "pg_get_keywords",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "pg_function_is_visible",
    "format_type",
    "obj_description",
    "col_description",
    "shobj_description",
    "has_any_column_privilege",
    "has_column_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_schema_privilege",
    "has_sequence_privilege",
    "has_table_privilege",
    "has_type_privilege",
    "pg_has_role",
    "to_regclass",
    "to_regnamespace",
    "to_regproc",
    "to_regprocedure",
    "to_regrole",
    "to_regtype",
];

impl FunctionCatalog {
    /// The SQL to run on a node to get the rows for [`FunctionCatalog::from_rows`]:
    /// schema name, function name and `provolatile` of every function.
    pub const LOAD_SQL: &'static str = "SELECT n.nspname, p.proname, p.provolatile \
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace";

    /// Built-in knowledge with no database: a static list of common immutable
    /// or stable pg_catalog functions and aggregates. Anything not listed, or
    /// qualified with another schema, is treated as volatile.
    pub fn builtin() -> FunctionCatalog {
        FunctionCatalog::from_rows(
            BUILTIN_SAFE
                .iter()
                .chain(WINDOW_FUNCTIONS)
                .map(|name| ("pg_catalog".to_owned(), (*name).to_owned(), 's')),
        )
    }

    /// From `pg_proc` rows `(schema, name, provolatile)` as returned by
    /// [`FunctionCatalog::LOAD_SQL`]: a function name in a schema is safe only
    /// if every overload is 'i' (immutable) or 's' (stable). Sequence,
    /// advisory-lock, large-object, transaction-id, `set_config`, `pg_notify`,
    /// `dblink*` and `pg_sleep*` functions are unsafe whatever the rows say.
    pub fn from_rows<I: IntoIterator<Item = (String, String, char)>>(rows: I) -> FunctionCatalog {
        let mut names: HashMap<String, HashMap<String, bool>> = HashMap::new();
        for (schema, name, volatility) in rows {
            let safe = matches!(volatility, 'i' | 's') && !always_unsafe(&name);
            names
                .entry(name)
                .or_default()
                .entry(schema)
                .and_modify(|s| *s &= safe)
                .or_insert(safe);
        }
        FunctionCatalog { names }
    }

    /// Whether a call of `name` may run in a read on a subscriber.
    ///
    /// `schema` is `None` when the call is unqualified: the name then resolves
    /// through the session's `search_path`, which the proxy does not track, so
    /// it is safe only if every schema's function of that name is safe.
    pub fn is_read_safe(&self, schema: Option<&str>, name: &str) -> bool {
        if always_unsafe(name) {
            return false;
        }
        let Some(schemas) = self.names.get(name) else {
            return false;
        };
        match schema {
            Some(schema) => schemas.get(schema).copied().unwrap_or(false),
            None => schemas.values().all(|safe| *safe),
        }
    }

    /// Number of distinct function names the catalog knows.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the catalog knows no function at all (every call is unsafe).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(rows: &[(&str, &str, char)]) -> FunctionCatalog {
        FunctionCatalog::from_rows(
            rows.iter()
                .map(|(s, n, v)| ((*s).to_owned(), (*n).to_owned(), *v)),
        )
    }

    #[test]
    fn builtin_knows_common_safe_functions() {
        let c = FunctionCatalog::builtin();
        for name in [
            "count",
            "sum",
            "lower",
            "now",
            "to_char",
            "date_trunc",
            "extract",
            "jsonb_extract_path",
            "array_agg",
            "string_agg",
            "version",
            "current_setting",
            "pg_typeof",
            "format",
            "concat",
        ] {
            assert!(c.is_read_safe(None, name), "{name}");
            assert!(c.is_read_safe(Some("pg_catalog"), name), "{name}");
        }
    }

    #[test]
    fn builtin_rejects_volatile_and_unknown() {
        let c = FunctionCatalog::builtin();
        for name in [
            "nextval",
            "setval",
            "currval",
            "random",
            "clock_timestamp",
            "gen_random_uuid",
            "pg_advisory_lock",
            "lo_import",
            "my_func",
            "LOWER",
        ] {
            assert!(!c.is_read_safe(None, name), "{name}");
        }
        // A safe name in a schema the catalog does not know is someone else's function.
        assert!(!c.is_read_safe(Some("public"), "lower"));
        // Every builtin entry must pass the always-unsafe filter.
        for name in BUILTIN_SAFE.iter().chain(WINDOW_FUNCTIONS) {
            assert!(!always_unsafe(name), "{name}");
        }
    }

    #[test]
    fn from_rows_requires_every_overload_to_be_safe() {
        let c = rows(&[
            ("pg_catalog", "lower", 'i'),
            ("pg_catalog", "now", 's'),
            ("pg_catalog", "random", 'v'),
            ("pg_catalog", "f", 'i'),
            ("pg_catalog", "f", 'v'),
            ("pg_catalog", "g", 'i'),
            ("public", "g", 'v'),
            ("app", "h", 's'),
            ("pg_catalog", "nextval", 'i'),
            ("pg_catalog", "pg_advisory_xact_lock", 's'),
        ]);
        assert!(c.is_read_safe(None, "lower"));
        assert!(c.is_read_safe(Some("pg_catalog"), "now"));
        assert!(!c.is_read_safe(None, "random"));
        assert!(!c.is_read_safe(None, "f"), "one volatile overload");
        assert!(!c.is_read_safe(None, "g"), "volatile in another schema");
        assert!(c.is_read_safe(Some("pg_catalog"), "g"));
        assert!(!c.is_read_safe(Some("public"), "g"));
        assert!(c.is_read_safe(Some("app"), "h"));
        assert!(c.is_read_safe(None, "h"));
        assert!(!c.is_read_safe(Some("other"), "h"));
        assert!(!c.is_read_safe(None, "unknown"));
        assert!(!c.is_read_safe(None, "nextval"), "always unsafe");
        assert!(!c.is_read_safe(None, "pg_advisory_xact_lock"));
        assert_eq!(c.len(), 8);
    }

    #[test]
    fn empty_catalog_trusts_nothing() {
        let c = FunctionCatalog::default();
        assert!(c.is_empty());
        assert!(!c.is_read_safe(None, "lower"));
    }
}
